"""Tail averaging (--average_last_fraction): the saved LoRA and cond_proj are the mean of the weights
over the run's last steps, a resume in the middle of that window saves the same mean; on by default for a range student
only, refused under ZeRO-3."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import reset_accelerate_state, run_training, train_args, write_image_folder
from sd_distill.constants import GUIDANCE_PROJ_WEIGHTS_NAME, LORA_WEIGHTS_NAME, STATE_FILE_NAME
from sd_distill.train.averaging import WeightAverage, averaging_errors, averaging_start
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
    assert "mean of the weights after each of the last 3 training steps" in (out / "README.md").read_text()


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


def test_a_checkpoint_of_the_earlier_format_keeps_its_mean(caplog: pytest.LogCaptureFixture) -> None:
    """A state saved before "last_step" was recorded, resumed with the same --max_train_steps (10 steps,
    0.25: the window after step 8, as those runs had it), keeps its mean and says nothing."""
    model = _tiny_student()
    before = WeightAverage(model, start_step=averaging_start(10, 0.25))
    for step in range(1, 10):
        before.update(step)
    old = {k: v for k, v in before.state_dict().items() if k != "last_step"}
    after = WeightAverage(model, start_step=averaging_start(10, 0.25))
    with caplog.at_level(logging.WARNING):
        after.load_state_dict(old)
    assert after.start_step == 8 and after.count == 1 and not caplog.text
    assert all(torch.equal(after.mean[n], before.mean[n]) for n in before.mean)


def test_zero3_refuses_averaging_with_a_way_out() -> None:
    ranged = TrainConfig(guidance_scale_range=[2.0, 8.0])
    (error,) = averaging_errors(ranged, zero_stage=3)
    assert "ZeRO-3" in error and "--average_last_fraction 0" in error and "on by default" in error
    (error,) = averaging_errors(TrainConfig(average_last_fraction=0.5), zero_stage=3)  # a fixed-w student's own choice
    assert "--average_last_fraction 0.5:" in error and "default" not in error
    assert averaging_errors(ranged, zero_stage=2) == []
    assert averaging_errors(TrainConfig(guidance_scale_range=[2.0, 8.0], average_last_fraction=0.0), zero_stage=3) == []


def _tiny_student() -> torch.nn.Module:
    """A module with what WeightAverage reads: LoRA-named weights and the time embedding's cond_proj."""
    model = torch.nn.Module()
    model.block = torch.nn.ModuleDict({"lora_A": torch.nn.Linear(2, 2, bias=False)})
    model.time_embedding = torch.nn.Module()
    model.time_embedding.cond_proj = torch.nn.Linear(2, 2, bias=False)
    return model


@pytest.mark.parametrize(
    "saved_start, resumed_at, warned",
    [(8, 4, False), (8, 9, True), (8, 6, True)],
    ids=["the new window still whole ahead", "a mean begun is dropped", "a window already entered"],
)
def test_a_changed_window_on_resume_warns_only_when_steps_are_lost(
    saved_start: int, resumed_at: int, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    model = _tiny_student()
    before = WeightAverage(model, start_step=saved_start)
    for step in range(1, resumed_at + 1):
        before.update(step)
    after = WeightAverage(model, start_step=5)  # --max_train_steps changed: another window
    with caplog.at_level(logging.WARNING):
        after.load_state_dict(before.state_dict())
    assert after.count == 0 and ("--max_train_steps changed" in caplog.text) == warned, caplog.text
    after.update(resumed_at + 1)
    assert after.count == int(resumed_at + 1 > 5)


def test_the_saved_mean_gets_validation_images_of_its_own(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The last step's images are rendered as always; beside them, those of the student that is saved."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    from sd_distill import load_student

    data, out = write_image_folder(tmp_path / "data", n=4), tmp_path / "out"
    prompt, steps = "a red circle", 2
    render = ("--validation_prompts", prompt, "--validation_steps", "6", "--num_validation_inference_steps", str(steps))
    run_training(_args(tiny_model_dir, data, out, *render))
    folder = out / "validation"
    last, mean = (np.asarray(Image.open(folder / d / "00-student-w7.5.png")) for d in ("step-6", "step-6-mean"))

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model_dir), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    load_student(pipe, out)
    gen = torch.Generator("cpu").manual_seed(42)  # the run's --seed, which validation samples with
    saved = np.asarray(pipe(prompt, guidance_scale=7.5, num_inference_steps=steps, generator=gen).images[0])
    assert np.abs(mean.astype(int) - saved.astype(int)).max() <= 1  # the saved student's image
    assert not np.array_equal(last, mean)  # not the last step's


def test_a_window_of_one_step_is_not_rendered_twice(tiny_model_dir: Path, tmp_path: Path) -> None:
    data, out = write_image_folder(tmp_path / "data", n=4), tmp_path / "out"
    render = (
        "--validation_prompts",
        "a red circle",
        "--validation_steps",
        "6",
        "--num_validation_inference_steps",
        "1",
    )
    run_training(_args(tiny_model_dir, data, out, *render, "--average_last_fraction", "0.1"))  # the window: step 6
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-6"]
    assert (
        "the averaging window (`--average_last_fraction 0.1`) held that one step only"
        in (out / "README.md").read_text()
    )
