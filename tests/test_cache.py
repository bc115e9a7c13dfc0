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


@pytest.mark.parametrize("raised", ["OSError", "SafetensorError"])  # the second is what safetensors raises
def test_a_disk_that_fills_while_writing_names_the_file_and_leaves_no_tmp(
    raised: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"half a file")
        if raised == "OSError":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    data = write_image_folder(tmp_path / "data", n=4)
    with pytest.raises(ConfigError) as err:
        run_training(train_args(tiny_model_dir, data, tmp_path / "out", *CACHED))
    message = str(err.value)
    assert message.startswith("disk full writing ") and "latents-" in message and "MB free there" in message
    assert "\n" not in message
    # the half-written file is gone (the lock file marks the folder as a run's and stays)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != ".sd-distill.lock"]


def test_the_half_cache_file_of_a_killed_run_is_removed(tiny_model_dir: Path, tmp_path: Path) -> None:
    data, out = write_image_folder(tmp_path / "data", n=4), tmp_path / "out"
    run_training(train_args(tiny_model_dir, data, out, *CACHED))
    cache = out / "cache"
    written = sorted(p.name for p in cache.iterdir())
    for name in written:  # as if a run had been killed while writing each of them, then they were lost
        (cache / f".{name}.tmp-999999999").write_bytes(b"half a file")
        (cache / name).unlink()
    run_training(train_args(tiny_model_dir, data, out, *CACHED, "--overwrite_output_dir"))
    assert sorted(p.name for p in cache.iterdir()) == written
