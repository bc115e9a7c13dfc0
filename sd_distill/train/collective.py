"""Decisions every rank takes together: a check one rank makes (the main process reads the output
folder, any rank may fail a write) becomes every rank's answer, so no rank waits forever in a
collective that the others have left."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..files import OutputWriteError

logger = logging.getLogger(__name__)


def first_failure(accelerator: Any, message: str | None) -> str | None:
    """Every rank passes its own failure message (or ``None``); every rank gets the first one."""
    if accelerator.num_processes == 1:
        return message
    from accelerate.utils import gather_object

    return next((m for m in gather_object([message]) if m), None)


def from_main(accelerator: Any, value: Any) -> Any:
    """The main process's ``value`` (picklable), on every rank."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def all_true(accelerator: Any, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank."""
    if accelerator.num_processes == 1:
        return flag
    import torch

    count = torch.tensor([float(flag)], device=accelerator.device)
    return int(accelerator.reduce(count, reduction="sum").item()) == accelerator.num_processes


def main_process_writes(accelerator: Any, write: Callable[[], None]) -> None:
    """``write()`` on the main process; a failed write (:class:`OutputWriteError`) is raised on every
    rank. Every rank calls this, so it is also a barrier: no rank goes on while the main one writes.
    Any other error of the main process is raised there as it is, and the other ranks stop with its
    one line (else they would wait here until ``--ddp_timeout``)."""
    failure, error = None, None
    if accelerator.is_main_process:
        try:
            write()
        except OutputWriteError as err:
            failure = str(err)
        except Exception as err:
            error, failure = err, f"the main process failed while writing the outputs: {type(err).__name__}: {err}"
    failure = first_failure(accelerator, failure)
    if error is not None:
        raise error
    if failure is not None:
        raise OutputWriteError(failure)


def raise_if_collective(err: Exception) -> None:
    """A failed collective itself (a dead peer, a timeout) is raised as it is: no rank is left to agree
    with (check it first: on a nearly full disk it would pass for a full one)."""
    import torch.distributed

    if isinstance(err, torch.distributed.DistError):
        raise err


def failure_line(err: Exception, path: str | Path) -> str:
    """A failed write that is not about the disk (and not a collective's: :func:`raise_if_collective`
    first), as the one line every rank learns (its traceback is logged here, on the rank that had it)."""
    logger.error("writing %s failed", path, exc_info=err)
    return f"writing {str(path)!r} failed: {type(err).__name__}: {err}"
