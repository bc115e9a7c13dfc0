"""Writing files so that a failure never leaves a half file over a good one: strict JSON, writes to a
temporary sibling renamed over the target, and one clear message when the disk is full or read-only."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"  # temporary siblings are ``.<name>.tmp-<pid>``: hidden, and never taken for the real file
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_LOW_SPACE = 1 << 20  # a write that fails with less than this free has most likely filled the disk


class OutputWriteError(RuntimeError):
    """A file or folder could not be written (disk full, read-only, ...). The message names it, and
    says what is left intact; the CLI prints it and exits with status 2."""

    def __init__(self, message: str, no_space: bool = False) -> None:
        super().__init__(message)
        self.no_space = no_space


def strict_json(value: Any, **kwargs: Any) -> str:
    """JSON that every parser reads: NaN and infinities become ``null`` (``json.dumps`` would write
    the non-standard ``NaN``)."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")


def replace_atomically(path: str | Path, write: Callable[[Path], Any], needed_bytes: int | None = None) -> Path:
    """``write(tmp)`` a temporary sibling of ``path``, then rename it over ``path``: a reader, or a
    write that fails half-way (disk full), never sees a half file, and the old ``path`` stays intact.
    ``needed_bytes`` (an estimate) goes into the disk-full message."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except Exception as err:
        remove_quietly(tmp)
        failed = as_write_error(err, path, needed_bytes)
        if failed is None:
            raise
        raise failed from None
    fsync_dir(path.parent)
    return path


def write_atomically(path: str | Path, data: str | bytes) -> Path:
    """Text (UTF-8) or bytes to ``path`` with :func:`replace_atomically`."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return replace_atomically(path, lambda tmp: tmp.write_bytes(raw), len(raw))


def as_write_error(err: BaseException, path: str | Path, needed_bytes: int | None = None) -> OutputWriteError | None:
    """``err``, raised while writing ``path``, as one line; ``None`` when it is not about the disk.
    Writers do not all raise OSError: safetensors (Rust) keeps the errno only in its message, and
    torch.save reports a full disk as "unexpected pos" with no errno at all; then the free space tells."""
    if isinstance(err, OutputWriteError):
        return err
    if isinstance(err, OSError):
        return write_error(err, path, needed_bytes)
    found = re.search(r"os error (\d+)", str(err))
    if found:
        code = int(found.group(1))
        return write_error(OSError(code, os.strerror(code)), path, needed_bytes)
    free = free_bytes(Path(path))
    if free is not None and free < max(needed_bytes or 0, _LOW_SPACE):
        return write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path, needed_bytes)
    return None


def write_error(
    err: OSError, path: str | Path, needed_bytes: int | None = None, kept: str = "nothing was replaced"
) -> OutputWriteError:
    """One line for a failed write: which file, and for a full disk how much was needed and is free
    and what was ``kept`` intact."""
    if err.errno in _NO_SPACE:
        need = f"about {human_size(needed_bytes)} needed, " if needed_bytes else ""
        free = free_bytes(Path(path))
        have = f"{human_size(free)} free" if free is not None else "free space unknown"
        return OutputWriteError(
            no_space=True,
            message=f"no space left on the device writing {str(path)!r} ({need}{have}); {kept}. Free some space "
            "or choose a folder on another disk, then run again.",
        )
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputWriteError(f"cannot write {str(path)!r}: {err.strerror} (a read-only disk or no permission).")
    return OutputWriteError(f"could not write {str(path)!r}: {err.strerror or err}.")


def free_bytes(path: Path) -> int | None:
    """Free space of the disk holding ``path`` (or its nearest existing parent)."""
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder if folder.is_dir() else folder.parent).free
            except OSError:
                return None
    return None


def human_size(n: int | float | None) -> str:
    value = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def remove_stale_temps(folder: Path, name: str = "*") -> list[Path]:
    """Remove temporary siblings (of ``name``) in ``folder`` left by a process that was killed while
    writing them (a fused export's can be gigabytes); those of live processes stay."""
    removed = []
    for tmp in folder.glob(f".{name}{TEMP_MARK}*"):
        pid = tmp.name.rsplit(TEMP_MARK, 1)[-1]
        if pid.isdigit() and not is_alive(int(pid)):
            remove_quietly(tmp)
            removed.append(tmp)
    return removed


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_quietly(path: Path) -> None:
    """Remove a file or folder that may not exist (clean-up after a failed write)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
