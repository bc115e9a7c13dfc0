"""The output folder over a run's life: one run at a time (a lock), on a disk every rank shares, and
nothing lost. ``--overwrite_output_dir`` sets the previous run aside and deletes it only once the new
LoRA is written (a failed run puts it back); a resume from an earlier step sets later outputs of the
abandoned run aside, so that ``latest`` can never jump to them."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from ..constants import (
    CONFIG_FILE_NAME,
    GUIDANCE_PROJ_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    MODEL_CARD_NAME,
    SUMMARY_FILE_NAME,
)
from ..files import fsync_dir, remove_quietly, remove_stale_temps, write_atomically, write_error
from .checkpoint import list_checkpoints, outside
from .collective import all_true, first_failure, from_main
from .config import ConfigError, TrainConfig
from .ownership import (
    ABANDONED_PREFIX,
    FAILED_REPLACEMENT_PREFIX,
    LOCK_NAME,
    PREVIOUS_PREFIX,
    SHARED_TOKEN_PREFIX,
    is_our_card,
    later_outputs,
    our_folders,
)
from .resume import finished_run

logger = logging.getLogger(__name__)
# How long a rank on another machine looks for the main process's token: an NFS client may cache a
# folder's listing for a while. SD_DISTILL_SHARED_WAIT_S overrides it (a slow filesystem; tests).
SHARED_WAIT_S = 10.0


class RunLock:
    """An exclusive lock on ``<output_dir>/.sd-distill.lock``, held for the life of the run; the file
    says who holds it (pid, host, since when). The kernel drops it when the process dies. A POSIX
    record lock (``lockf``), not ``flock``: forked DataLoader workers inherit a flock with the file
    descriptor and keep it held after the run is killed; a record lock belongs to the process alone."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    @classmethod
    def acquire(cls, out: Path) -> RunLock:
        """Take the lock (creating ``out``); ConfigError naming the holder when another run has it."""
        import fcntl

        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"--output_dir {str(out)!r} is in use by another sd-distill run ({holder}); wait for it to "
                "finish or choose another --output_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode(), 0)
        return cls(fd)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing it releases the lock
            self.fd = None


def shared_dir_problem(accelerator: Any, out: Path) -> str | None:
    """None when every rank sees the file the main process just wrote into ``out``, else what is
    wrong. Every rank calls this; ranks elsewhere look for up to SHARED_WAIT_S (NFS caches folders)."""
    if accelerator.num_processes == 1:
        return None
    token = from_main(accelerator, SHARED_TOKEN_PREFIX + secrets.token_hex(8) if accelerator.is_main_process else None)
    path, failure = out / token, None
    if accelerator.is_main_process:
        try:
            path.write_text(token)
            fsync_dir(out)
        except OSError as err:
            failure = str(write_error(err, path))
    failure = first_failure(accelerator, failure)  # also the barrier: the token is written now
    if failure is not None:
        return failure
    wait = float(os.environ.get("SD_DISTILL_SHARED_WAIT_S", SHARED_WAIT_S))
    deadline = time.monotonic() + (0 if accelerator.is_main_process else wait)
    seen = _sees(path, token)
    while not seen and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = _sees(path, token)
    shared = all_true(accelerator, seen)
    if accelerator.is_main_process:
        path.unlink(missing_ok=True)
    if shared:
        return None
    return (
        f"--output_dir {str(out)!r} is not on a disk that every machine shares: processes on other machines "
        "cannot see what the main process writes there (checkpoints are written by every rank and read back "
        "on resume). Put --output_dir on a shared filesystem, at the same path on every machine."
    )


def _sees(path: Path, token: str) -> bool:
    try:
        return token in os.listdir(path.parent) and path.read_text() == token  # listdir revalidates NFS
    except OSError:
        return False


class RunDir:
    """What the main process does to the output folder around a run; on other ranks a no-op."""

    def __init__(self, out: Path, lock: RunLock | None) -> None:
        self.out, self.lock = out, lock
        self.previous: Path | None = None
        self.config: TrainConfig | None = None
        self.replaces = False  # an --overwrite_output_dir run, or a resume (of one, perhaps)

    @property
    def is_main(self) -> bool:
        return self.lock is not None

    def begin(self, config: TrainConfig, resume_from: Path | None, resume_step: int | None) -> None:
        """Before any model loads: set the previous run (overwrite) or the abandoned later outputs
        (resume) aside, then record the resolved config, the run's mark of ownership."""
        if not self.is_main:
            return
        self.config = config
        self.replaces = config.overwrite_output_dir or resume_step is not None
        unfinished = sorted(self.out.glob(PREVIOUS_PREFIX + "*"))
        if unfinished and not self.replaces:
            logger.warning(
                "an earlier --overwrite_output_dir run did not finish; the run it replaces is in %s", unfinished
            )
        # a checkpoint kept elsewhere (e.g. the one a failed --overwrite_output_dir run left in abandoned-*/)
        # continues a run that replaces this folder's: set that run aside whole, as a fresh overwrite does
        elsewhere = resume_from is not None and outside(resume_from, self.out)
        if config.overwrite_output_dir and (resume_step is None or elsewhere):
            self.previous = _set_aside(self.out, _replaced_outputs(self.out, config), PREVIOUS_PREFIX)
            if self.previous is not None:
                logger.warning(
                    "--overwrite_output_dir: the previous run is kept in %s until this run's LoRA is written",
                    self.previous,
                )
        elif resume_step is not None:
            _abandon_later(self.out, resume_step)
        remove_stale_temps(self.out)  # files of a run killed while writing them
        write_atomically(self.out / CONFIG_FILE_NAME, config.to_json())

    def discard_previous(self) -> None:
        """The new LoRA is written: the run it replaces can go (also one that an interrupted
        --overwrite_output_dir run set aside, once a resume of it finishes)."""
        if not self.is_main:
            return
        for failed in self.out.glob(FAILED_REPLACEMENT_PREFIX + "*"):  # any run that finishes: `latest` is its
            os.replace(failed, self.out / (ABANDONED_PREFIX + failed.name[len(FAILED_REPLACEMENT_PREFIX) :]))
        if not self.replaces:
            return
        for old in self.out.glob(PREVIOUS_PREFIX + "*"):
            remove_quietly(old)
            logger.info("removed the replaced run %s", old)
        self.previous = None

    def failed(self) -> None:
        """The run stops with an error: put a run it was replacing back in place; release the lock. Never
        raises over the run's own error (a full disk may refuse even the folder the run is set aside in)."""
        try:
            self._put_previous_back()
        except OSError as err:
            logger.error(
                "could not put the previous run back (%s): it is in %s, this run's outputs in %s",
                err,
                self.previous,
                self.out,
            )
        self.release()

    def _put_previous_back(self) -> None:
        if self.is_main and self.previous is not None and self.previous.is_dir() and self.config is not None:
            partial = _set_aside(self.out, _replaced_outputs(self.out, self.config), FAILED_REPLACEMENT_PREFIX)
            for name in sorted(os.listdir(self.previous)):
                os.replace(self.previous / name, self.out / name)
            remove_quietly(self.previous)
            logger.warning(
                "the run failed: the previous run is back in %s%s",
                self.out,
                f" (this run's partial outputs are in {partial})" if partial else "",
            )
            kept = list_checkpoints(partial) if partial else []
            if kept:
                logger.warning(
                    "to go on with this run rather than start it again: --resume_from_checkpoint %s "
                    "--overwrite_output_dir",
                    kept[-1],
                )
            self.previous = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _replaced_outputs(out: Path, config: TrainConfig) -> list[Path]:
    """What --overwrite_output_dir replaces: the run's files, checkpoints, validation images and logs
    (not the cache, which is keyed by its contents, nor outputs already set aside)."""
    cache = Path(config.cache_dir).resolve() if config.cache_dir else (out / "cache").resolve()
    keep = {LOCK_NAME} | {n for n in our_folders(config) if (out / n).resolve() == cache}
    found = []
    for path in sorted(out.iterdir()):
        name = path.name
        if name in keep or name.startswith((ABANDONED_PREFIX, PREVIOUS_PREFIX, SHARED_TOKEN_PREFIX)):
            continue
        if name == MODEL_CARD_NAME and not is_our_card(path):
            continue
        found.append(path)
    return found


def _abandon_later(out: Path, step: int) -> None:
    """Resuming from ``step``: move what a run wrote after it (checkpoints, validation images, and its
    final outputs) aside, so that ``latest`` never jumps to them and nothing is deleted."""
    later = later_outputs(out, step)
    done = finished_run(out)
    if done is not None and done > step:
        finals = (LORA_WEIGHTS_NAME, GUIDANCE_PROJ_WEIGHTS_NAME, SUMMARY_FILE_NAME, MODEL_CARD_NAME)
        later += [out / n for n in finals if (out / n).exists()]
    folder = _set_aside(out, later, ABANDONED_PREFIX)
    if folder is not None:
        logger.warning(
            "resuming from step %d of a run that went further: moved its later outputs (%s) to %s; nothing was deleted",
            step,
            ", ".join(str(p.relative_to(out)) for p in later),
            folder,
        )


def _set_aside(out: Path, paths: list[Path], prefix: str) -> Path | None:
    """Move ``paths`` (inside ``out``) into a new ``out/<prefix><time>/``, keeping their relative paths."""
    if not paths:
        return None
    folder = out / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for path in paths:
        target = folder / path.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    fsync_dir(out)
    return folder
