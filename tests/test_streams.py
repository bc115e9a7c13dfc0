"""Streamed data: a stream read through more than once resumes exactly, and a stream of unreadable
images stops with a clear message instead of looping at 0 steps."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import reset_accelerate_state, run_training


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _stream(path: Path, images: list[bytes]) -> Path:
    import datasets

    rows = {"image": images, "caption": [f"a thing {i}" for i in range(len(images))]}
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    return path


def _args(model: Path, data: Path, out: Path, *extra: str, steps: int) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--dataset_name",
        str(data),
        "--streaming",
        "--output_dir",
        str(out),
        "--resolution",
        "32",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        str(steps),
        "--report_to",
        "none",
        "--default_prompt",
        "",
        "--learning_rate",
        "1e-3",
        "--lora_dropout",
        "0.1",
        *extra,
    ]


def _lora(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def test_a_stream_resumed_after_it_wrapped_gives_the_same_lora(tiny_model_dir: Path, tmp_path: Path) -> None:
    # 5 rows in batches of 2: 3 batches per pass, accumulated by 2 -> 2 updates per pass (the last
    # window ends with the pass). 6 steps read the stream 3 times; step 3 is inside the second pass.
    data = _stream(tmp_path / "s.parquet", [_png(i) for i in range(5)])
    common = ("--gradient_accumulation_steps", "2", "--checkpointing_steps", "3")
    reference = tmp_path / "reference"
    run_training(_args(tiny_model_dir, data, reference, *common, steps=6))
    expected = _lora(reference)
    reset_accelerate_state()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-3", resumed / "checkpoint-3")
    stats, _ = run_training(
        _args(tiny_model_dir, data, resumed, *common, "--resume_from_checkpoint", "latest", steps=6)
    )
    assert stats.global_step == 6
    got = _lora(resumed)
    assert max((got[k] - expected[k]).abs().max().item() for k in expected) == 0.0


def test_a_stream_of_unreadable_images_stops(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill.train.config import ConfigError

    data = _stream(tmp_path / "s.parquet", [b"not an image"] * 3)
    with pytest.raises(ConfigError, match=r"3 of the last 3 rows read cannot be decoded \(100%\), more than --max_bad"):
        run_training(_args(tiny_model_dir, data, tmp_path / "out", steps=2))
    reset_accelerate_state()
    # allowing every row to be bad still cannot train on nothing
    with pytest.raises(ConfigError, match=r"a whole pass over the data gave no batch"):
        run_training(_args(tiny_model_dir, data, tmp_path / "out2", "--max_bad_fraction", "1", steps=2))
