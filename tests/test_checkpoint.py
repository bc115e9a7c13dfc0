"""What a checkpoint promises: complete or invisible, found in step order, rotated without losing the
newest or the one a run resumed from, checked for damage before any model loads, and refused when it
was made with other settings or another launch."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import fake_checkpoint
from sd_distill.constants import CONFIG_FILE_NAME, LORA_WEIGHTS_NAME, STATE_FILE_NAME
from sd_distill.train.checkpoint import list_checkpoints, read_step, rotate
from sd_distill.train.config import ConfigError, TrainConfig
from sd_distill.train.resume import RESUME_RULES, check_compatible, pick_resume

LAUNCH = {"deepspeed": False, "zero_stage": None, "num_processes": 1, "precision": "no"}


def _checkpoint(folder: Path, step: int, **settings: object) -> Path:
    config = {
        "pretrained_model_name_or_path": "m",
        "lora_rank": 4,
        "lora_target_modules": ["to_q"],
        "teacher": "shared",
    }
    return fake_checkpoint(folder, step, {**config, **settings})


def _config(out: Path, **kw: object) -> TrainConfig:
    base = {"pretrained_model_name_or_path": "m", "lora_rank": 4, "lora_target_modules": ["to_q"]}
    return TrainConfig(output_dir=str(out), train_data_dir="x", **{**base, **kw})  # type: ignore[arg-type]


def test_checkpoints_are_listed_in_step_order_and_half_written_ones_are_invisible(tmp_path: Path) -> None:
    for step in (10, 2, 100):
        _checkpoint(tmp_path, step)
    (tmp_path / ".checkpoint-200.tmp").mkdir()
    (tmp_path / "checkpoint-notanumber").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10", "checkpoint-100"]


def test_latest_resumes_from_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 8)
    path, errors = pick_resume(_config(tmp_path, resume_from_checkpoint="latest"), LAUNCH)
    assert errors == [] and path == tmp_path / "checkpoint-8" and read_step(path) == 8


def test_latest_in_an_empty_folder_starts_fresh(tmp_path: Path) -> None:
    assert pick_resume(_config(tmp_path, resume_from_checkpoint="latest"), LAUNCH) == (None, [])


def test_rotation_keeps_the_checkpoint_being_resumed_from(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / ".checkpoint-10.tmp").mkdir()
    rotate(tmp_path, limit=1, newest=tmp_path / "checkpoint-8", protect=tmp_path / "checkpoint-2")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-8"]


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    """A later checkpoint of another run (10) must not make the one just written (5) the 'oldest'."""
    for step in (4, 5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    rotate(tmp_path, limit=1, newest=tmp_path / "checkpoint-5", protect=tmp_path / "checkpoint-4")
    assert (tmp_path / "checkpoint-5").is_dir()
    rotate(tmp_path, limit=1, newest=tmp_path / "checkpoint-5")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-10"]


def test_every_setting_has_a_resume_rule() -> None:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RESUME_RULES) == fields, set(RESUME_RULES) ^ fields
    assert set(RESUME_RULES.values()) == {"match", "honour"}


def test_a_checkpoint_of_other_settings_is_refused_naming_each_difference(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, 2, lora_rank=16, lora_alpha=32.0, seed=1, resolution=64, learning_rate=1.0)
    _, errors = pick_resume(_config(tmp_path, resume_from_checkpoint=str(path)), LAUNCH)
    assert len(errors) == 1
    for diff in (
        "lora_rank: checkpoint has 16, this run has 4",
        "lora_alpha: checkpoint has 32.0",
        "seed: ",
        "resolution: ",
    ):
        assert diff in errors[0]
    assert "learning_rate" not in errors[0]  # honoured: a resumed run may change it
    with pytest.raises(ConfigError, match="lora_rank"):
        check_compatible(path, _config(tmp_path))


def test_a_folder_without_training_state_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ConfigError, match="not an sd-distill checkpoint"):
        check_compatible(tmp_path / "checkpoint-3", _config(tmp_path))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "lora truncated": (lambda c: _truncate(c / LORA_WEIGHTS_NAME), "pytorch_lora_weights.safetensors is truncated"),
    "lora empty": (lambda c: (c / LORA_WEIGHTS_NAME).write_bytes(b""), "pytorch_lora_weights.safetensors is empty"),
    "lora missing": (lambda c: (c / LORA_WEIGHTS_NAME).unlink(), "pytorch_lora_weights.safetensors is missing"),
    "optimizer missing": (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    "optimizer truncated": (lambda c: _truncate(c / "optimizer.bin"), "optimizer.bin is truncated"),
    "scheduler missing": (lambda c: (c / "scheduler.bin").unlink(), "scheduler.bin is missing"),
    "rng truncated": (lambda c: _truncate(c / "random_states_0.pkl"), "random_states_0.pkl is truncated"),
    "state garbage": (lambda c: (c / STATE_FILE_NAME).write_text("{oops"), "training_state.json is not valid JSON"),
    "config not utf-8": (lambda c: (c / CONFIG_FILE_NAME).write_bytes(b"\xff\xfe{}"), "is not UTF-8 text"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_checkpoint_is_refused_and_latest_falls_back(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    damage, said = DAMAGE[case]
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    damage(newest)
    _, errors = pick_resume(_config(tmp_path, resume_from_checkpoint=str(newest)), LAUNCH)
    assert len(errors) == 1 and said in errors[0] and "checkpoint-4" in errors[0], errors
    with caplog.at_level(logging.WARNING):
        path, errors = pick_resume(_config(tmp_path, resume_from_checkpoint="latest"), LAUNCH)
    assert errors == [] and path == tmp_path / "checkpoint-2"
    assert "checkpoint-4" in caplog.text and "checkpoint-2" in caplog.text and said in caplog.text


def _with_registered_objects(checkpoint: Path, count: int, recorded: bool) -> None:
    """What accelerate writes for objects given to register_for_checkpointing (the weight average)."""
    for i in range(count):
        torch.save({"state": torch.zeros(64)}, checkpoint / f"custom_checkpoint_{i}.pkl")
    if recorded:
        state = json.loads((checkpoint / STATE_FILE_NAME).read_text())
        (checkpoint / STATE_FILE_NAME).write_text(json.dumps({**state, "custom_states": count}))


@pytest.mark.parametrize(
    "recorded, damage, said",
    [
        (True, lambda c: _truncate(c / "custom_checkpoint_1.pkl"), "custom_checkpoint_1.pkl is truncated"),
        (True, lambda c: (c / "custom_checkpoint_1.pkl").unlink(), "custom_checkpoint_1.pkl is missing"),
        (False, lambda c: (c / "custom_checkpoint_0.pkl").unlink(), "custom_checkpoint_0.pkl is missing"),
    ],
    ids=["truncated", "missing, recorded", "gap, older checkpoint"],
)
def test_a_damaged_registered_object_file_is_found_before_any_model_loads(
    recorded: bool, damage: Any, said: str, tmp_path: Path
) -> None:
    two = {"train_states": "student_trajectories", "average_last_fraction": 0.2}  # the pool, the average
    _with_registered_objects(_checkpoint(tmp_path, 2, **two), 2, recorded)
    newest = _checkpoint(tmp_path, 4, **two)
    _with_registered_objects(newest, 2, recorded)
    assert pick_resume(_config(tmp_path, resume_from_checkpoint=str(newest), **two), LAUNCH) == (newest, [])
    damage(newest)
    _, errors = pick_resume(_config(tmp_path, resume_from_checkpoint=str(newest), **two), LAUNCH)
    assert len(errors) == 1 and said in errors[0], errors
    latest = _config(tmp_path, resume_from_checkpoint="latest", **two)
    assert pick_resume(latest, LAUNCH) == (tmp_path / "checkpoint-2", [])


@pytest.mark.parametrize(
    "settings, recorded, files, said",
    [
        ({"average_last_fraction": 0.2}, None, 0, "custom_checkpoint_0.pkl is missing"),
        ({"average_last_fraction": 0.2, "train_states": "student_trajectories"}, None, 1, "custom_checkpoint_1.pkl"),
        ({}, 0, 1, "custom_checkpoint_0.pkl is more than the 0"),
        ({}, None, 1, "custom_checkpoint_0.pkl is more than the 0"),
        ({"average_last_fraction": 0.2}, "1", 1, "records '1' registered-object files, its settings make 1"),
        ({"average_last_fraction": 0.2}, 2, 1, "records 2 registered-object files, its settings make 1"),
    ],
    ids=[
        "older, averaging, its only file lost",
        "older, pool and average, one lost",
        "a stray file",
        "older, a stray file",
        "bad record",
        "record not what its settings make",
    ],
)
def test_registered_object_files_must_match_what_the_checkpoint_was_saved_with(
    settings: dict[str, Any], recorded: Any, files: int, said: str, tmp_path: Path
) -> None:
    """accelerate refuses, after the models load, a folder whose custom_checkpoint files are not one per
    registered object: an older checkpoint (no record) is judged by its own saved settings."""
    _checkpoint(tmp_path, 2, **settings)
    whole = int("average_last_fraction" in settings) + int("train_states" in settings)  # the average, the pool
    _with_registered_objects(tmp_path / "checkpoint-2", whole, True)
    newest = _checkpoint(tmp_path, 4, **settings)
    _with_registered_objects(newest, files, recorded=False)
    if recorded is not None:
        state = json.loads((newest / STATE_FILE_NAME).read_text())
        (newest / STATE_FILE_NAME).write_text(json.dumps({**state, "custom_states": recorded}))
    config = _config(tmp_path, resume_from_checkpoint=str(newest), **settings)
    _, errors = pick_resume(config, LAUNCH)
    assert len(errors) == 1 and said in errors[0], errors
    latest = dataclasses.replace(config, resume_from_checkpoint="latest")
    assert pick_resume(latest, LAUNCH) == (tmp_path / "checkpoint-2", [])


def test_when_no_checkpoint_is_whole_the_error_says_how_to_go_on(tmp_path: Path) -> None:
    for step in (2, 4):
        (_checkpoint(tmp_path, step) / "scheduler.bin").unlink()
    _, errors = pick_resume(_config(tmp_path, resume_from_checkpoint="latest"), LAUNCH)
    assert len(errors) == 1 and "checkpoint-4" in errors[0] and "scheduler.bin is missing" in errors[0]
    assert "--overwrite_output_dir" in errors[0], errors


def test_a_setting_a_new_default_changed_is_refused_with_the_flag_that_continues_it(tmp_path: Path) -> None:
    """A range checkpoint from before tail averaging (no such key) against today's default of 0.2."""
    path = _checkpoint(tmp_path, 2, guidance_scale_range=[1.5, 10.0], lora_target_modules=["to_q", "to_k"])
    config = _config(tmp_path, resume_from_checkpoint=str(path), guidance_scale_range=[1.5, 10.0])
    _, errors = pick_resume(config, LAUNCH)
    assert len(errors) == 1
    assert "average_last_fraction: checkpoint has 0.0, this run has 0.2 (pass --average_last_fraction=0.0" in errors[0]
    assert "(pass --lora_target_modules to_q to_k to continue it)" in errors[0], errors


@pytest.mark.parametrize(
    "saved, now, hint",
    [
        ({"center_crop": False}, {"center_crop": True}, "(pass --no-center_crop to continue it)"),
        ({"snr_gamma": None}, {"snr_gamma": 5.0}, "(leave out --snr_gamma to continue it)"),
        ({"variant": "-fp16"}, {"variant": "fp16"}, "(pass --variant=-fp16 to continue it)"),
    ],
    ids=["a bool", "a setting the checkpoint lacked", "a value that starts with a dash"],
)
def test_each_hint_is_a_flag_the_parser_takes_and_the_resume_then_passes(
    saved: dict[str, Any], now: dict[str, Any], hint: str, tmp_path: Path
) -> None:
    import shlex

    from sd_distill.train.config import parse_args

    path = _checkpoint(tmp_path, 2, **saved)
    _, errors = pick_resume(_config(tmp_path, resume_from_checkpoint=str(path), **now), LAUNCH)
    assert len(errors) == 1 and hint in errors[0], errors
    base = ["--train_data_dir", "x", "--pretrained_model_name_or_path", "m", "--lora_rank", "4"]
    base += ["--lora_target_modules", "to_q", "--output_dir", str(tmp_path), "--resume_from_checkpoint", str(path)]
    given = [w for k, v in now.items() for w in ([f"--{k}"] if v is True else [f"--{k}", str(v)])]
    suggested = shlex.split(hint.removeprefix("(pass ").removesuffix(" to continue it)")) if "pass" in hint else []
    if "leave out" in hint:
        given = []
    assert pick_resume(parse_args(base + given + suggested), LAUNCH) == (path, [])


def test_a_checkpoint_of_another_launch_is_refused(tmp_path: Path) -> None:
    plain = _checkpoint(tmp_path, 2)
    _, errors = pick_resume(_config(tmp_path, resume_from_checkpoint=str(plain)), {**LAUNCH, "deepspeed": True})
    assert "without DeepSpeed" in errors[0] and "under DeepSpeed" in errors[0]
    _, errors = pick_resume(_config(tmp_path, resume_from_checkpoint=str(plain)), {**LAUNCH, "num_processes": 2})
    assert "written by 1 process(es) and this run has 2" in errors[0]

    ds = _checkpoint(tmp_path, 4)
    (ds / "optimizer.bin").unlink()
    (ds / STATE_FILE_NAME).write_text(json.dumps({"global_step": 4, "num_processes": 2, "deepspeed": True}))
    torch.save({}, ds / "random_states_1.pkl")
    (ds / "pytorch_model").mkdir()
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({}, ds / "pytorch_model" / name)
    ds_launch = {**LAUNCH, "deepspeed": True, "num_processes": 2}
    _, errors = pick_resume(_config(tmp_path, resume_from_checkpoint=str(ds)), ds_launch)
    assert "no optim shard of rank 1" in errors[0]  # a rank's shard is missing
    torch.save({}, ds / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert pick_resume(_config(tmp_path, resume_from_checkpoint=str(ds)), ds_launch) == (ds, [])
    _, errors = pick_resume(_config(tmp_path, resume_from_checkpoint=str(ds)), LAUNCH)
    assert "written with DeepSpeed" in errors[0]


def test_a_load_state_failure_keeps_the_reason_on_its_later_lines(tmp_path: Path) -> None:
    """accelerate puts the counts of its refusal on the lines after the first; the one line keeps them."""
    from sd_distill.train.integrity import load_state_or_error

    class Refuses:
        num_processes = 1

        def load_state(self, path: str, **kwargs: Any) -> None:
            raise RuntimeError(
                "Number of custom checkpoints in folder x does not match the number of registered objects:\n"
                "\tFound checkpoints: 0\n\tRegistered objects: 1\n" + "Please make sure " * 40
            )

    with pytest.raises(ConfigError) as raised:
        load_state_or_error(Refuses(), tmp_path)
    message = str(raised.value)
    assert "\n" not in message and "Found checkpoints: 0 Registered objects: 1" in message
    assert "sure …)" in message and message.count("Please") < 40, message  # cut, at a word
