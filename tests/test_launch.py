"""Settings both the launch and the flags give (accumulation, clipping, DeepSpeed's micro-batch):
one value reaches accelerate and DeepSpeed, or the run stops before loading models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sd_distill.models import Components
from sd_distill.train.config import TrainConfig
from sd_distill.train.launch import resolve_launch
from sd_distill.train.validation import encoders_on

YAML_GA = {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "ACCELERATE_CONFIG_DS_FIELDS": "gradient_accumulation_steps"}


def _config(**kw: object) -> TrainConfig:
    return TrainConfig(train_data_dir="x", **kw)  # type: ignore[arg-type]


def test_without_a_launch_value_the_flag_or_the_default_is_used() -> None:
    config, errors = resolve_launch(_config(gradient_accumulation_steps=4, max_grad_norm=0.5), {})
    assert not errors and (config.gradient_accumulation_steps, config.max_grad_norm) == (4, 0.5)
    config, errors = resolve_launch(_config(), {})
    assert not errors and (config.gradient_accumulation_steps, config.max_grad_norm) == (1, 1.0)


def test_a_yaml_value_is_adopted_when_the_flag_is_not_given() -> None:
    env = {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4", "ACCELERATE_GRADIENT_CLIPPING": "0.3"}
    config, errors = resolve_launch(_config(), env)
    assert not errors and (config.gradient_accumulation_steps, config.max_grad_norm) == (4, 0.3)


def test_a_flag_that_the_yaml_contradicts_is_refused_naming_both() -> None:
    _, errors = resolve_launch(_config(gradient_accumulation_steps=2), YAML_GA)
    assert len(errors) == 1
    assert "--gradient_accumulation_steps 2" in errors[0]
    assert "the accelerate config's deepspeed_config.gradient_accumulation_steps says 1" in errors[0]
    _, errors = resolve_launch(_config(gradient_accumulation_steps=1), {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    assert errors and "says 4" in errors[0]  # the reverse is refused too


def test_numbers_in_a_deepspeed_json_must_agree_with_the_flags(tmp_path: Path) -> None:
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {"gradient_clipping": 1.0, "gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": 4}
        )
    )
    env = {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}
    _, errors = resolve_launch(_config(max_grad_norm=0.5, gradient_accumulation_steps=3, train_batch_size=2), env)
    assert any("--max_grad_norm 0.5" in e and "gradient_clipping in" in e for e in errors)
    assert any("--train_batch_size 2" in e and "train_micro_batch_size_per_gpu 4" in e for e in errors)
    assert not any("accumulation" in e for e in errors)  # "auto" takes the flag


def _spy_module(moves: list[str]) -> torch.nn.Module:
    module = torch.nn.Linear(1, 1)
    module.to = lambda device, *a, **k: moves.append(str(device)) or module  # type: ignore[method-assign]
    return module


@pytest.mark.parametrize("parked", [False, True])
def test_validation_moves_the_encoders_only_when_they_were_parked(parked: bool) -> None:
    moves: list[str] = []
    components = Components(None, _spy_module(moves), _spy_module(moves), None, None, encoders_parked=parked)
    # On one GPU accelerate's device is "cuda" and a module's "cuda:0": unequal, yet nothing was parked.
    with encoders_on(components, torch.device("cuda")):
        assert moves == (["cuda", "cuda"] if parked else [])
    assert moves == (["cuda", "cuda", "cpu", "cpu"] if parked else [])


def test_more_processes_on_a_machine_than_gpus_is_said_before_the_accelerator() -> None:
    from sd_distill.processes import gpu_count_error

    assert "starts 4 processes on this machine, which has 2 GPU(s)" in gpu_count_error({"LOCAL_WORLD_SIZE": "4"}, 2)
    assert gpu_count_error({"LOCAL_WORLD_SIZE": "2"}, 2) is None
    assert gpu_count_error({"LOCAL_WORLD_SIZE": "2"}, 0) is None  # a CPU machine: gloo, no device per rank
    assert gpu_count_error({"LOCAL_WORLD_SIZE": "4", "ACCELERATE_USE_CPU": "true"}, 2) is None
    assert gpu_count_error({}, 1) is None  # a plain python run
