"""Bad data is skipped, non-finite losses are handled, and interrupted runs resume exactly."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import NanTarget, run_training, subprocess_env, train_args, write_image_folder
from sd_distill.train.config import parse_args

ROOT = Path(__file__).resolve().parents[1]


def _broken_folder(folder: Path) -> Path:
    """4 good RGB rows plus every kind of awkward row a scraped dataset has."""
    write_image_folder(folder, n=4)
    rng = np.random.default_rng(1)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "corrupt.png").write_bytes(b"this is not an image")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), "L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(folder / "deep16.png")
    Image.new("CMYK", (40, 40), (10, 200, 30, 0)).save(folder / "cmyk.jpg")
    rows += [
        {"file_name": "corrupt.png", "text": "a broken one"},
        {"file_name": "truncated.png", "text": "a cut one"},
        {"file_name": "grey.png", "text": "a grey one"},
        {"file_name": "alpha.png", "text": ""},
        {"file_name": "deep16.png", "text": None},
        {"file_name": "cmyk.jpg", "text": "a cmyk one"},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


def test_broken_rows_are_skipped_and_counted(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill.train import run

    data = _broken_folder(tmp_path / "data")
    stats = run(parse_args(train_args(tiny_model_dir, data, tmp_path / "out", "--max_bad_fraction", "0.3", steps=3)))
    assert stats.global_step == 3
    assert stats.skipped_rows == 2  # corrupt + truncated; grey, alpha, 16-bit and CMYK are converted
    assert stats.empty_captions == 2  # "" and null train on the empty prompt
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["skipped_rows"] == 2


def test_mostly_broken_data_stops_with_a_clear_message(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill.train import run
    from sd_distill.train.config import ConfigError

    data = _broken_folder(tmp_path / "data")  # 2 of 10 unreadable = 20 % > 10 % default
    with pytest.raises(ConfigError, match=r"2 of 10 images .* cannot be decoded.*--max_bad_fraction"):
        run(parse_args(train_args(tiny_model_dir, data, tmp_path / "out")))  # latents cached: that pass scans
    assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    assert not list(tmp_path.rglob("latents-*")), "a failing scan must not be kept as a cache"


def _delete_images(folder: Path, names: list[str]):
    """An edit for ``run_training``: the images vanish after the scan found them readable."""

    def edit(training: Any) -> None:
        for name in names:
            (folder / name).unlink()

    return edit


def test_an_image_deleted_mid_run_is_skipped_and_counted(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", n=8)
    uncached = ("--no-cache_latents", "--max_bad_fraction", "0.2")
    stats, _ = run_training(
        train_args(tiny_model_dir, data, tmp_path / "out", *uncached), _delete_images(data, ["3.png"])
    )
    assert stats.global_step == 4 and stats.skipped_rows == 1  # 8 rows in batches of 2: 3.png read once
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_many_images_deleted_mid_run_stop_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill.train.config import ConfigError

    data = write_image_folder(tmp_path / "data", n=8)
    gone = _delete_images(data, ["0.png", "2.png", "5.png"])
    with pytest.raises(ConfigError, match=r"of the last \d+ rows read cannot be decoded.*deleted or changed during"):
        run_training(train_args(tiny_model_dir, data, tmp_path / "out", "--no-cache_latents", steps=8), gone)


def _nan_on(calls: set[int] | None):
    """An edit for ``run_training``: the target turns NaN on the given calls (every call when None)."""

    def edit(training: Any) -> None:
        training.target = NanTarget(training.target, calls)

    return edit


def test_a_nan_loss_skips_the_update_and_is_counted(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    data = write_image_folder(tmp_path / "data", n=4)
    stats, _ = run_training(train_args(tiny_model_dir, data, tmp_path / "out", steps=4), _nan_on({2}))
    assert stats.skipped_nonfinite == 1 and stats.global_step == 4
    lora = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in lora.values())


def test_repeated_nan_losses_stop_the_run_with_the_fp16_hint(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill.train import TrainingError

    data = write_image_folder(tmp_path / "data", n=4)
    with pytest.raises(TrainingError, match=r"3 steps in a row.*fp16.*bf16"):
        run_training(
            train_args(tiny_model_dir, data, tmp_path / "out", "--max_consecutive_nonfinite", "3", steps=10),
            _nan_on(None),
        )


# ------------------------------------------------------------------------------------------------
# Interruption: kill -9 / SIGTERM, then --resume_from_checkpoint latest, must give the same LoRA
# ------------------------------------------------------------------------------------------------
STEPS = 12
# The reference loads on the training thread, the interrupted runs in 2 persistent workers: the
# epoch reaches the workers with each index, so the rows, crops and flips are the same.
NO_WORKERS, WORKERS = ("--dataloader_num_workers", "0"), ("--dataloader_num_workers", "2")


def _cmd(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    args = train_args(
        model, data, out, "--lora_dropout", "0.1", "--random_flip", "--caption_dropout", "0.2", *extra, steps=STEPS
    )
    return [sys.executable, str(ROOT / "train_sd_distil_lora.py"), *args]


def _interrupt_when(cmd: list[str], marker: Path, sig: int, timeout: float = 300) -> int:
    """Start ``cmd``; send ``sig`` as soon as ``marker`` exists. Returns the exit status."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def _lora(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def test_killed_runs_resume_to_the_same_weights_as_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", n=6)
    reference = tmp_path / "reference"
    subprocess.run(
        _cmd(tiny_model_dir, data, reference, *NO_WORKERS),
        env=subprocess_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    expected = _lora(reference)

    # 1) SIGKILL right after the first checkpoint; leave a half-written checkpoint behind too,
    #    as a kill during a save would: `latest` must ignore it.
    killed = tmp_path / "killed"
    code = _interrupt_when(_cmd(tiny_model_dir, data, killed, *WORKERS), killed / "checkpoint-2", signal.SIGKILL)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "pytorch_lora_weights.safetensors").exists()
    half = killed / ".checkpoint-99.tmp"
    half.mkdir(exist_ok=True)
    (half / "pytorch_lora_weights.safetensors").write_bytes(b"half")
    subprocess.run(
        _cmd(tiny_model_dir, data, killed, *WORKERS, "--resume_from_checkpoint", "latest"),
        env=subprocess_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    got = _lora(killed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected), "resumed run differs from the uninterrupted one"

    # 2) SIGTERM with --save_on_interrupt later in the run: a checkpoint at the stop step, exit 130.
    termed = tmp_path / "termed"
    code = _interrupt_when(
        _cmd(tiny_model_dir, data, termed, *WORKERS, "--save_on_interrupt"), termed / "checkpoint-6", signal.SIGTERM
    )
    assert code == 130
    steps = sorted(int(p.name.split("-")[1]) for p in termed.glob("checkpoint-*"))
    assert steps and steps[-1] >= 6
    subprocess.run(
        _cmd(tiny_model_dir, data, termed, *WORKERS, "--save_on_interrupt", "--resume_from_checkpoint", "latest"),
        env=subprocess_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    got = _lora(termed)
    assert all(torch.equal(got[k], expected[k]) for k in expected), "run resumed after SIGTERM differs"
