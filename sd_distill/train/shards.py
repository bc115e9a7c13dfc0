"""Work split across ranks at start-up (the bad-row scan, the latent and text caches) and its results
brought back together, so that no rank waits in a barrier while another does everything.

Rows go to ranks in fixed chunks of :data:`CHUNK` (chunk ``c`` to rank ``c % world``); a chunk is one
VAE or text-encoder batch whatever the number of ranks, so the assembled result equals a
single-process one bit for bit. Parts travel through files where every rank sees every rank's file
(a shared disk, or one machine) and through the process group where it does not (node-local disks).
Every step that can fail on one rank (a full disk) is agreed on by all, so they stop together.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..files import as_write_error, remove_quietly, temp_sibling
from .collective import failure_line, raise_if_collective
from .config import ConfigError

CHUNK = 16  # rows per chunk: one VAE / text-encoder batch


def my_chunks(n: int, accelerator: Any) -> list[range]:
    """This rank's chunks of ``range(n)``."""
    world, rank = world_and_rank(accelerator)
    return [range(s, min(s + CHUNK, n)) for s in range(rank * CHUNK, n, world * CHUNK)]


def world_and_rank(accelerator: Any) -> tuple[int, int]:
    """``(ranks, this rank)`` as the collectives see them. accelerate can report several processes
    with no process group (``--multi_gpu`` without CUDA): then each works alone, on every row."""
    from accelerate.utils import DistributedType

    if accelerator is None or accelerator.distributed_type == DistributedType.NO:
        return 1, 0
    return accelerator.num_processes, accelerator.process_index


def gather(accelerator: Any, mine: Any) -> list[Any]:
    """Every rank's ``mine``, in rank order (small objects: row lists, counts, messages)."""
    if world_and_rank(accelerator)[0] == 1:
        return [mine]
    from accelerate.utils import gather_object

    return gather_object([mine])


def agree_on_error(accelerator: Any, error: str | None) -> None:
    """Raise the first rank's error on every rank (all ranks must call this)."""
    errors = [e for e in gather(accelerator, error) if e]
    if errors:
        raise ConfigError(errors[0])


def every_rank(accelerator: Any, flag: bool) -> bool:
    return all(gather(accelerator, bool(flag)))


def exchange(
    accelerator: Any, folder: Path, name: str, mine: dict[str, torch.Tensor]
) -> tuple[list[dict[str, torch.Tensor]], bool]:
    """Every rank's tensors ``mine``, in rank order, and whether ``folder`` is one disk for all ranks:
    parts go through files there when every rank can read every rank's part, else through the process
    group. Every rank calls this."""
    world, rank = world_and_rank(accelerator)
    if world == 1:
        return [mine], True
    from safetensors.torch import load_file

    parts = [folder / f".{name}.part{i}-of-{world}.safetensors" for i in range(world)]
    agree_on_error(accelerator, save_tensors(parts[rank], mine))
    shared = every_rank(accelerator, all(p.is_file() for p in parts))
    # node-local disks: the other machines' parts are not here, so they travel over the network
    result = [load_file(str(p)) for p in parts] if shared else gather(accelerator, mine)
    accelerator.wait_for_everyone()  # every rank has read every part before any is removed
    parts[rank].unlink(missing_ok=True)
    return result, shared


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str | None:
    """Write ``tensors`` to ``path`` atomically; the problem as one line instead of raising (the caller
    agrees on it with the other ranks). A full disk names the file, its size and the free space."""
    from safetensors.torch import save_file

    packed = {k: v.contiguous() for k, v in tensors.items()}
    return write_atomic(path, lambda tmp: save_file(packed, str(tmp), metadata=metadata), nbytes(packed))


def write_atomic(path: Path, write: Callable[[Path], Any], size: int, flag: str = "--cache_dir") -> str | None:
    """``write(tmp)`` then rename it to ``path``; the problem as one line (``flag``: the folder's option)."""
    tmp = temp_sibling(path)  # hidden, and removed by remove_stale_temps once its writer is dead
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
        return None
    except Exception as exc:  # safetensors' full disk is a SafetensorError ("os error 28"), not an OSError
        raise_if_collective(exc)
        remove_quietly(tmp)  # a read-only disk refuses even unlinking a file that is not there
        failed = as_write_error(exc, path, size)
        if failed is None:  # still every rank's line: the ranks agree on the outcome next
            return failure_line(exc, path)
        if failed.no_space:
            return f"disk full writing {path}: it needs {_mb(size)}, {_mb(free_bytes(path.parent))} free there; " + (
                f"free some space or point {flag} at another disk."
            )
        return str(failed)


def space_error(folder: Path, size: int, what: str, flag: str = "--cache_dir") -> str | None:
    """Refuse before encoding when ``folder``'s disk cannot take ``size`` bytes."""
    free = free_bytes(folder)
    if free >= size * 1.05:  # safetensors' header and the file system's blocks
        return None
    return (
        f"not enough disk space for the {what} in {folder}: it needs about {_mb(size)}, {_mb(free)} free; "
        f"free some space or point {flag} at another disk."
    )


def free_bytes(folder: Path) -> int:
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return shutil.disk_usage(existing).free


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"
