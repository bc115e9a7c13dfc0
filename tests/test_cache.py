"""The latent/text cache on a full disk: refused before encoding when the space is visibly short,
one clear line and no temporary file left when the disk fills while writing."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from helpers import run_training, train_args, write_image_folder
from sd_distill.train.config import ConfigError

CACHED = ("--cache_latents", "--cache_text_embeddings")


def test_too_little_free_space_is_refused_before_encoding(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import sd_distill.train.shards as shards

    monkeypatch.setattr(shards, "free_bytes", lambda folder: 1000)
    data = write_image_folder(tmp_path / "data", n=4)
    with pytest.raises(ConfigError, match=r"not enough disk space for the latent cache in .*cache: it needs about"):
        run_training(train_args(tiny_model_dir, data, tmp_path / "out", *CACHED))
    assert not list((tmp_path / "out").rglob("*.safetensors*"))


def test_a_disk_that_fills_while_writing_names_the_file_and_leaves_no_tmp(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import safetensors.torch

    def full_disk(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    data = write_image_folder(tmp_path / "data", n=4)
    with pytest.raises(ConfigError) as err:
        run_training(train_args(tiny_model_dir, data, tmp_path / "out", *CACHED))
    message = str(err.value)
    assert message.startswith("disk full writing ") and "latents-" in message and "MB free there" in message
    assert "\n" not in message
    # the half-written file is gone (the lock file marks the folder as a run's and stays)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != ".sd-distill.lock"]
