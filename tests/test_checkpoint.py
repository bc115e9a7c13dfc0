"""What a checkpoint promises: complete or invisible, found in step order, rotated without losing
the one a run resumed from, and refused when it was made with other settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sd_distill.constants import CONFIG_FILE_NAME, STATE_FILE_NAME
from sd_distill.train.checkpoint import check_compatible, list_checkpoints, read_step, resolve_resume, rotate
from sd_distill.train.config import ConfigError, TrainConfig


def _checkpoint(folder: Path, step: int, **settings: object) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / STATE_FILE_NAME).write_text(json.dumps({"global_step": step}))
    config = {
        "pretrained_model_name_or_path": "m",
        "lora_rank": 4,
        "lora_target_modules": ["to_q"],
        "teacher": "shared",
        **settings,
    }
    (path / CONFIG_FILE_NAME).write_text(json.dumps(config))
    return path


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
    path = resolve_resume(_config(tmp_path, resume_from_checkpoint="latest"))
    assert path == tmp_path / "checkpoint-8" and read_step(path) == 8


def test_latest_in_an_empty_folder_starts_fresh(tmp_path: Path) -> None:
    assert resolve_resume(_config(tmp_path, resume_from_checkpoint="latest")) is None


def test_rotation_keeps_the_checkpoint_being_resumed_from(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / ".checkpoint-10.tmp").mkdir()
    rotate(tmp_path, limit=1, protect=tmp_path / "checkpoint-2")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-8"]


def test_a_checkpoint_of_other_settings_is_refused_naming_each_difference(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, 2, lora_rank=16)
    with pytest.raises(ConfigError, match=r"lora_rank: checkpoint has 16, this run has 4"):
        check_compatible(path, _config(tmp_path))


def test_a_folder_without_training_state_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(ConfigError, match="not an sd-distill checkpoint"):
        check_compatible(tmp_path / "checkpoint-3", _config(tmp_path))
