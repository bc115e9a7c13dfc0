"""The end of a process that may belong to a ``torch.distributed`` group (``accelerate launch``)."""

from __future__ import annotations

import atexit
import faulthandler
import os
import sys
from collections.abc import Mapping


def launched_with_peers() -> bool:
    """True in a worker that ``accelerate launch`` / torchrun started beside other processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def report_native_crashes() -> None:
    """A native abort (SIGABRT, SIGSEGV) in a launched worker prints every thread's Python stack
    to stderr, so the log says where it happened; without it the launcher only reports ``-6``."""
    if launched_with_peers() and not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)


def close_process_group() -> None:
    """Destroy the default process group, if one is up, before the interpreter exits.

    Left to interpreter shutdown, gloo's worker threads are destroyed while still joinable and the
    process aborts ("terminate called without an active exception", SIGABRT) about one run in ten
    on the CPU, after its work is done: a finished comparison or a clean ``error:`` then exits -6.
    NCCL warns about the same omission. Safe to call twice and without a group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Exit with ``code`` once ``main`` has closed the process group; a launched worker skips the
    interpreter's teardown.

    Even with its group destroyed, a finished 2-process DeepSpeed run aborted once in CI after its
    LoRA was saved (rank 1, "terminate called without an active exception", SIGABRT), and the
    launcher then failed the whole run. The teardown frees the C++ side of torch.distributed and
    DeepSpeed objects in no set order, where a joinable thread's destruction aborts; nothing a
    finished worker needs happens there. So a worker runs the ``atexit`` handlers (logging,
    trackers, multiprocessing) and flushes its streams, as a normal exit would, and leaves with
    ``os._exit``; its files are closed by then."""
    if not launched_with_peers():
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say
            pass
    os._exit(code)


def gpu_count_error(environ: Mapping[str, str] = os.environ, gpus: int | None = None) -> str | None:
    """More processes on this machine than it has GPUs (a yaml's ``num_processes: 4`` on a 2-GPU box):
    said by every rank before the accelerator is made, where the extra ranks would fail on a CUDA
    'invalid device ordinal' traceback."""
    if environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        return None
    if gpus is None:
        import torch  # here only: this module stays light

        gpus = torch.cuda.device_count()
    local = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if gpus == 0 or local <= gpus:
        return None
    return (
        f"the launch starts {local} processes on this machine, which has {gpus} GPU(s): set num_processes in the "
        f"accelerate config (or accelerate launch --num_processes) to {gpus} per machine."
    )
