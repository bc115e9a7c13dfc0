"""Tail averaging (--average_last_fraction): the saved LoRA and cond_proj are the mean of the weights
over the run's last steps, a resume in the middle of that window saves the same mean; on by default for a range student
only, refused under ZeRO-3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import reset_accelerate_state, run_training, train_args, write_image_folder
from sd_distill.constants import GUIDANCE_PROJ_WEIGHTS_NAME, LORA_WEIGHTS_NAME, STATE_FILE_NAME
from sd_distill.train.averaging import averaging_errors, averaging_start
from sd_distill.train.config import TrainConfig

RANGE = ("--guidance_scale_range", "2", "8", "--guidance_embedding_dim", "32", "--learning_rate", "1e-2")
pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(folder / LORA_WEIGHTS_NAME)), **load_file(str(folder / GUIDANCE_PROJ_WEIGHTS_NAME))}


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    every_step = ("--checkpointing_steps", "1", "--average_last_fraction", "0.5")
    return train_args(model, data, out, *RANGE, *every_step, *extra, steps=6)


def test_the_saved_student_is_the_mean_of_its_last_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    data, out = write_image_folder(tmp_path / "data", n=4), tmp_path / "out"
    run_training(_args(tiny_model_dir, data, out))
    saved, steps = _weights(out), [_weights(out / f"checkpoint-{k}") for k in (4, 5, 6)]  # 0.5 of 6 steps
    for name, value in saved.items():
        assert torch.allclose(value, sum(s[name] for s in steps) / 3, atol=1e-7), name
    last = steps[-1]
    assert any(not torch.allclose(saved[k], last[k], atol=1e-6) for k in saved)  # not the last step's


def test_a_run_resumed_inside_the_window_saves_the_same_mean(tiny_model_dir: Path, tmp_path: Path) -> None:
    data, out = write_image_folder(tmp_path / "data", n=4), tmp_path / "out"
    run_training(_args(tiny_model_dir, data, out))
    whole = _weights(out)
    # the mean is accelerate's registered object 0; the checkpoint records it, so a lost file is found early
    assert json.loads((out / "checkpoint-5" / STATE_FILE_NAME).read_text())["custom_states"] == 1
    assert (out / "checkpoint-5" / "custom_checkpoint_0.pkl").is_file()
    reset_accelerate_state()  # checkpoint-5 holds the mean of steps 4 and 5
    run_training(_args(tiny_model_dir, data, out, "--resume_from_checkpoint", str(out / "checkpoint-5")))
    resumed = _weights(out)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_range_student_averages_its_last_fifth_by_default_and_a_fixed_w_one_does_not() -> None:
    assert TrainConfig(guidance_scale_range=[2.0, 8.0]).average_last_fraction == 0.2
    assert TrainConfig().average_last_fraction == 0.0
    assert averaging_start(500, 0.2) == 400 and averaging_start(4, 0.01) == 3  # at least the last step


def test_zero3_refuses_averaging_with_a_way_out() -> None:
    ranged = TrainConfig(guidance_scale_range=[2.0, 8.0])
    (error,) = averaging_errors(ranged, zero_stage=3)
    assert "ZeRO-3" in error and "--average_last_fraction 0" in error
    assert averaging_errors(ranged, zero_stage=2) == []
    assert averaging_errors(TrainConfig(guidance_scale_range=[2.0, 8.0], average_last_fraction=0.0), zero_stage=3) == []
