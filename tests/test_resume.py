"""Resuming real runs: an abandoned later branch is set aside (never picked by ``latest``, never
deleted), a finished run is left alone, a new learning rate takes effect, and a damaged checkpoint
gives one line, not a traceback."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_training, train_args, write_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    sys.path.insert(0, str(ROOT))
    from train_sd_distil_lora import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def finished(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, output folder) of a finished 4-step run with checkpoints 2 and 4."""
    root = tmp_path_factory.mktemp("finished")
    data = write_image_folder(root / "data", n=4)
    run_training(train_args(tiny_model_dir, data, root / "out", steps=4))
    return data, root / "out"


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


def test_resuming_an_earlier_checkpoint_sets_the_later_branch_aside(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", n=4)
    out = tmp_path / "out"
    run_training(train_args(tiny_model_dir, data, out, steps=10))  # checkpoints 2, 4, ..., 10 + a final LoRA
    for step in (2, 6, 8):
        shutil.rmtree(out / f"checkpoint-{step}")  # the scenario: checkpoint-4 and checkpoint-10 exist

    limit = ("--checkpoints_total_limit", "1", "--checkpointing_steps", "1")
    resume = ("--resume_from_checkpoint", str(out / "checkpoint-4"))
    run_training(train_args(tiny_model_dir, data, out, *limit, *resume, steps=6))
    # the new run's newest checkpoint survives rotation; the one resumed from is kept too
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    (aside,) = out.glob("abandoned-*")  # the later branch: moved, not deleted
    assert (aside / "checkpoint-10" / "training_state.json").is_file()
    assert (aside / "pytorch_lora_weights.safetensors").is_file() and (aside / "train_summary.json").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 6 and summary["first_step"] == 4  # what its figures cover (F5)

    _, training = run_training(train_args(tiny_model_dir, data, out, "--resume_from_checkpoint", "latest", steps=7))
    assert training.resume_from == out / "checkpoint-6" and training.start_step == 6


def test_latest_on_a_finished_run_changes_nothing(
    tiny_model_dir: Path, finished: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = finished
    out = _copy(run, tmp_path)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file() and "lock" not in p.name}
    code, stdout, _ = _main(train_args(tiny_model_dir, data, out, "--resume_from_checkpoint", "latest"), capsys)
    assert code == 0 and "nothing to do" in stdout and "already finished its 4 steps" in stdout
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file() and "lock" not in p.name}
    assert after == before
    summary = json.loads((out / "train_summary.json").read_text())
    assert isinstance(summary["final_loss"], float)  # the finished run's loss, not NaN from an empty re-run


def test_the_summary_is_strict_json(tmp_path: Path) -> None:
    from sd_distill.train.config import TrainConfig
    from sd_distill.train.loop import Stats
    from sd_distill.train.outputs import write_summary

    write_summary(TrainConfig(output_dir=str(tmp_path)), Stats())  # final_loss is NaN before any step
    text = (tmp_path / "train_summary.json").read_text()
    assert "NaN" not in text and json.loads(text)["final_loss"] is None


def test_a_resumed_run_uses_the_new_learning_rate(
    tiny_model_dir: Path, finished: tuple[Path, Path], tmp_path: Path
) -> None:
    data, run = finished
    out = _copy(run, tmp_path)
    argv = train_args(
        tiny_model_dir, data, out, "--resume_from_checkpoint", str(out / "checkpoint-2"), "--learning_rate", "1e-9"
    )
    seen: list[float] = []
    _, training = run_training(argv, lambda tr: seen.append(tr.optimizer.param_groups[0]["lr"]))
    assert seen == [pytest.approx(1e-9)] and training.lr_scheduler.get_last_lr() == [pytest.approx(1e-9)]
    # two more steps at 1e-9 leave the adapter where checkpoint-2 had it (at 1e-3 each step moves it ~1e-3)
    start, end = _lora(out / "checkpoint-2"), _lora(out)
    assert max((end[k] - start[k]).abs().max().item() for k in start) < 1e-6
    assert max((start[k] - _lora(run)[k]).abs().max().item() for k in start) > 1e-4


def test_a_changed_setting_is_refused_naming_each(
    tiny_model_dir: Path, finished: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = finished
    out = _copy(run, tmp_path)
    extra = ("--resume_from_checkpoint", "latest", "--lora_alpha", "8", "--seed", "3", "--no-cache_latents")
    code, _, err = _main(train_args(tiny_model_dir, data, out, *extra, steps=6), capsys)
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    for diff in ("lora_alpha: checkpoint has None, this run has 8.0", "seed: checkpoint has 42, this run has 3"):
        assert diff in err
    assert "cache_latents: checkpoint has True, this run has False" in err


@pytest.mark.parametrize("case", ["truncated", "wrong content"])
def test_a_damaged_optimizer_state_gives_one_line(
    case: str, tiny_model_dir: Path, finished: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = finished
    out = _copy(run, tmp_path)
    optimizer = out / "checkpoint-2" / "optimizer.bin"
    if case == "truncated":  # found before any model loads
        optimizer.write_bytes(optimizer.read_bytes()[:100])
    else:  # a whole archive of the wrong thing: only load_state finds out
        torch.save({"not": "an optimizer"}, optimizer)
    argv = train_args(tiny_model_dir, data, out, "--resume_from_checkpoint", str(out / "checkpoint-2"), steps=6)
    code, _, err = _main(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.count("error: ") == 1 and "optimizer.bin" in err and "checkpoint-2" in err, err
    assert (out / "checkpoint-4").is_dir() and not list(out.glob("abandoned-*"))  # a failed resume moved nothing


def test_a_range_checkpoint_without_its_guidance_projection_is_damaged(tmp_path: Path) -> None:
    """Its saved settings train a student told w: resumed without cond_proj, the hook would keep a zero
    one and train on, the projection's progress silently lost."""
    from safetensors.torch import save_file

    from helpers import fake_checkpoint
    from sd_distill.constants import GUIDANCE_PROJ_KEY, GUIDANCE_PROJ_WEIGHTS_NAME
    from sd_distill.train.integrity import checkpoint_damage

    path = fake_checkpoint(tmp_path / "out", 2, {"guidance_scale_range": [2.0, 8.0], "average_last_fraction": 0})
    assert checkpoint_damage(path) == []
    (path / GUIDANCE_PROJ_WEIGHTS_NAME).unlink()
    assert f"{GUIDANCE_PROJ_WEIGHTS_NAME} is missing" in checkpoint_damage(path)
    save_file({GUIDANCE_PROJ_KEY: torch.zeros(8, 4)}, str(path / GUIDANCE_PROJ_WEIGHTS_NAME))
    assert checkpoint_damage(path) == []
    fixed = fake_checkpoint(tmp_path / "fixed", 2, {"average_last_fraction": 0})
    assert checkpoint_damage(fixed) == []  # a fixed-w student has none
