"""Both CLIs close the process group on every way out: left open, gloo's threads abort a finished
process at interpreter exit about one run in ten (SIGABRT, exit -6, after its outputs are written).
A launched worker then leaves without the interpreter's teardown, having run what a normal exit runs."""

from __future__ import annotations

import os
import subprocess
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


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONFAULTHANDLER")}
    return subprocess.run(
        [sys.executable, "-c", code], env={**base, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True
    )


_EXIT_WITH_AN_ATEXIT_HANDLER = """
import atexit, sys
from pathlib import Path
from sd_distill.processes import exit_process
atexit.register(lambda: Path({marker!r}).write_text("ran"))
sys.stdout.write("unflushed output")
exit_process(3)
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_keeps_the_code_the_atexit_handlers_and_the_output(tmp_path: Path, world_size: str) -> None:
    marker = tmp_path / "atexit-ran"
    proc = _run_python(_EXIT_WITH_AN_ATEXIT_HANDLER.format(marker=str(marker)), WORLD_SIZE=world_size)
    assert proc.returncode == 3, proc.stderr
    assert marker.read_text() == "ran"
    assert proc.stdout == "unflushed output"


def test_a_launched_worker_that_aborts_says_where() -> None:
    code = "import os\nfrom sd_distill.processes import report_native_crashes\nreport_native_crashes()\nos.abort()\n"
    launched = _run_python(code, WORLD_SIZE="2")
    assert launched.returncode == -6
    assert "Fatal Python error: Aborted" in launched.stderr and "line 4" in launched.stderr
    alone = _run_python(code)  # a plain run keeps Python's default (no handler installed by us)
    assert alone.returncode == -6 and "Fatal Python error" not in alone.stderr
