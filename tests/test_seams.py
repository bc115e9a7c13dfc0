"""The recipe's seams: a new source of training states or a new target plugs into the unchanged
loop. Each test swaps in a test double between ``setup`` and ``train_loop``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from helpers import run_training, train_args, write_image_folder
from sd_distill.train.states import TrainingStates


class StoredStates:
    """A source double whose states carry the target already, as a trajectory buffer would."""

    def __init__(self, real: Any) -> None:
        self.real, self.calls = real, 0

    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> TrainingStates:
        self.calls += 1
        states = self.real(batch, generator)
        states.target = torch.zeros_like(states.x_t, dtype=torch.float32)
        return states


class ZeroTarget:
    """A target double: the student learns to predict zero, and is told nothing extra."""

    def __init__(self) -> None:
        self.calls = 0

    def teacher_prediction(self, states: TrainingStates, teacher: Any) -> torch.Tensor:
        self.calls += 1
        return torch.zeros_like(states.x_t, dtype=torch.float32)

    def student_inputs(self, states: TrainingStates) -> dict[str, Any]:
        return {}


def _no_teacher(training: Any) -> list[int]:
    """Make any teacher call fail loudly; returns the list the calls would be counted in."""
    calls: list[int] = []

    def teacher() -> Any:
        calls.append(1)
        raise AssertionError("the teacher ran although the states carry the target")

    training.teacher = teacher
    return calls


def test_a_source_with_stored_targets_trains_without_a_teacher_pass(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", n=4)
    seen: dict[str, Any] = {}

    def edit(training: Any) -> None:
        training.source = seen["source"] = StoredStates(training.source)
        seen["teacher_calls"] = _no_teacher(training)

    stats, _ = run_training(train_args(tiny_model_dir, data, tmp_path / "out", steps=3), edit)
    assert stats.global_step == 3 and seen["source"].calls == 3 and not seen["teacher_calls"]


def test_a_new_target_is_what_the_student_learns(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", n=4)
    target = ZeroTarget()

    def edit(training: Any) -> None:
        training.target = target

    argv = train_args(
        tiny_model_dir,
        data,
        tmp_path / "out",
        "--learning_rate",
        "1e-2",
        "--lora_rank",
        "8",
        "--checkpointing_steps",
        "1000",
        "--logging_steps",
        "1",
        steps=40,
    )
    stats, _ = run_training(argv, edit)
    assert target.calls == 40
    # the tiny UNet's raw output is far from zero; learning the zero target must shrink the loss
    assert sum(stats.losses[-5:]) / 5 < 0.7 * sum(stats.losses[:5]) / 5, stats.losses
