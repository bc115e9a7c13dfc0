"""Both CLIs close the process group on every way out: left open, gloo's threads abort a finished
process at interpreter exit about one run in ten (SIGABRT, exit -6, after its outputs are written)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from helpers import train_args, write_image_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def process_group(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group, as ``accelerate launch`` leaves one behind in each worker."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():  # the test failed: do not leak the group into later tests
        dist.destroy_process_group()


def _script_main(name: str) -> Callable[[list[str]], int]:
    sys.path.insert(0, str(ROOT))
    return __import__(name).main


def test_training_error_exit_closes_the_group(process_group: None, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", n=2)
    code = _script_main("train_sd_distil_lora")(train_args(tmp_path / "no-such-model", data, tmp_path / "out"))
    assert code == 2
    assert not dist.is_initialized()


def test_comparison_error_exit_closes_the_group(process_group: None, tmp_path: Path) -> None:
    code = _script_main("inf_txt2img_loop")(["--ft_model", str(tmp_path / "no-such-lora"), "--out_dir", str(tmp_path)])
    assert code == 2
    assert not dist.is_initialized()


def test_closing_without_a_group_is_harmless() -> None:
    from sd_distill.processes import close_process_group

    close_process_group()
    close_process_group()
    assert not dist.is_initialized()
