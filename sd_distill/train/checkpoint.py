"""``checkpoint-<step>`` folders: written atomically by every rank, listed, rotated.

A checkpoint holds the LoRA adapter (safetensors, with its adapter metadata), the optimizer/
scheduler/RNG state that ``accelerator.save_state`` writes (under DeepSpeed without the frozen base
weights), ``training_state.json`` (the step and the launch it was made under: process count,
DeepSpeed, precision) and the resolved training config. It is written to a hidden temporary folder
and renamed when complete, so ``latest`` never picks a half-written one; a failed write (disk full)
removes the temporary folder and leaves every earlier checkpoint as it was. What a resume checks and
honours is in :mod:`.resume`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..conditioning import StudentWeights, save_student, student_weights
from ..constants import CONFIG_FILE_NAME, STATE_FILE_NAME
from ..files import (
    OutputWriteError,
    as_write_error,
    folder_size,
    fsync_dir,
    remove_quietly,
    strict_json,
    write_error,
)
from ..lora import adapter_metadata
from .collective import failure_line, first_failure, main_process_writes, raise_if_collective
from .integrity import count_custom_states

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
DEEPSPEED_TAG = "pytorch_model"  # the tag accelerate saves its (first) DeepSpeed model under


def checkpoint_step(path: Path) -> int | None:
    """The step in a ``checkpoint-<step>`` folder name (``None`` for any other name)."""
    m = _CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if (step := checkpoint_step(p)) is not None and p.is_dir()]
    return [p for _, p in sorted(found)]


def outside(checkpoint: Path, output_dir: Path) -> bool:
    """Whether ``checkpoint`` is not one of ``output_dir``'s own (e.g. one a failed run set aside)."""
    return checkpoint.resolve().parent != output_dir.resolve()


def read_step(path: Path) -> int:
    return int(json.loads((path / STATE_FILE_NAME).read_text())["global_step"])


def deepspeed_engine(accelerator: Any) -> Any:
    """The DeepSpeed engine of a prepared run (``None`` without DeepSpeed): it holds the fp32 master
    weights that are saved instead of its bf16/fp16 module copy."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return None if wrapped is None else wrapped.engine


def launch_record(accelerator: Any, step: int) -> dict[str, Any]:
    """``training_state.json``: the step and what a resume must launch alike (a DeepSpeed checkpoint
    has one optimizer shard per process, and every rank restores its own RNG state)."""
    engine = deepspeed_engine(accelerator)
    return {
        "global_step": step,
        "num_processes": accelerator.num_processes,
        "deepspeed": engine is not None,
        "zero_stage": None if engine is None else int(engine.zero_optimization_stage()),
        "mixed_precision": accelerator.mixed_precision,
    }


def save_checkpoint(accelerator: Any, unet: Any, config: Any, step: int, protect: Path | None = None) -> Path:
    """Write ``checkpoint-<step>``; every rank must call this (DeepSpeed saves collectively). On a
    failed write every rank raises :class:`OutputWriteError` and the earlier checkpoints stay."""
    output_dir = Path(config.output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    needed = _expected_size(output_dir)
    failure = None
    if accelerator.is_main_process:
        remove_quietly(tmp)  # leftovers of a run killed mid-save
        failure = _attempt(lambda: tmp.mkdir(parents=True), tmp, needed)
    failure = first_failure(accelerator, failure)
    if failure is None:
        failure = _attempt(lambda: _save_state(accelerator, tmp), tmp, needed)
        failure = first_failure(accelerator, failure)  # before the next collective: every rank skips it alike
    if failure is None:
        weights = student_weights(unet, deepspeed_engine(accelerator))  # collective under DeepSpeed
        if accelerator.is_main_process:
            failure = _attempt(lambda: _write_own_files(tmp, weights, unet, config, accelerator, step), tmp, needed)
        failure = first_failure(accelerator, failure)
    if failure is not None:
        if accelerator.is_main_process:
            remove_quietly(tmp)
        raise OutputWriteError(_checkpoint_failure(failure, final, needed))

    def publish() -> None:
        try:
            _publish(tmp, final)
        except OSError as err:  # e.g. an fsync refused on a network disk
            raise write_error(err, final, kept="the earlier checkpoints are intact") from None
        rotate(output_dir, config.checkpoints_total_limit, newest=final, protect=protect)
        logger.info("saved %s (%.2f MB)", final, folder_size(final) / 2**20)

    main_process_writes(accelerator, publish)  # also the barrier: no rank goes on before it is in place
    return final


def _save_state(accelerator: Any, tmp: Path) -> None:
    """``accelerator.save_state``: under DeepSpeed without the frozen base, and with its writes' failures
    raised only after its collectives (:func:`_deepspeed_write_failures_deferred`)."""
    engine = deepspeed_engine(accelerator)
    if engine is None:
        accelerator.save_state(str(tmp))
        return
    with _deepspeed_write_failures_deferred(engine) as failures:
        accelerator.save_state(str(tmp), exclude_frozen_parameters=True, save_latest=False)
    if failures:
        raise failures[0]


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``. The same step written again (a run resumed and killed
    before it moved on) replaces the old folder only once the new one is in place."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        remove_quietly(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    remove_quietly(old)


def _write_own_files(tmp: Path, weights: StudentWeights, unet: Any, config: Any, accelerator: Any, step: int) -> None:
    save_student(weights, tmp, adapter_metadata(unet))
    if deepspeed_engine(accelerator) is not None:  # the tag file DeepSpeed's own tools read (zero_to_fp32)
        (tmp / "latest").write_text(DEEPSPEED_TAG)
    (tmp / CONFIG_FILE_NAME).write_text(config.to_json())
    record = {**launch_record(accelerator, step), "custom_states": count_custom_states(tmp)}
    (tmp / STATE_FILE_NAME).write_text(strict_json(record))
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(tmp)


def _attempt(action: Any, path: Path, needed: int | None) -> str | None:
    """Run ``action``; a failure becomes its one-line message (every rank then learns it: a rank that
    raised instead would leave the others waiting in the agreement until ``--ddp_timeout``)."""
    try:
        action()
    except Exception as err:
        raise_if_collective(err)
        failed = as_write_error(err, path, needed)
        if failed is None:
            return failure_line(err, path)
        return (_NO_SPACE_MARK if failed.no_space else "") + str(failed)
    return None


_NO_SPACE_MARK = "\0no-space\0"  # travels with the message to every rank


@contextmanager
def _deepspeed_write_failures_deferred(engine: Any) -> Iterator[list[BaseException]]:
    """DeepSpeed's ``save_checkpoint`` runs collectives between and after each rank's writes (a barrier;
    under ZeRO-3 also an all_gather). A rank whose write raised would leave it early while the others
    wait in the next collective until ``--ddp_timeout`` (attack finding F7, a full disk). Inside this
    block its writes record their first failure and skip the rest instead, so every rank runs every
    collective; the caller raises the failure once ``save_checkpoint`` has returned. (Its ``latest``
    tag, written with a bare ``open``, is ours to write: ``save_latest=False``.)"""
    failures: list[BaseException] = []
    if engine is None:
        yield failures
        return

    def deferred(write: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            if failures:
                return
            try:
                write(*args, **kwargs)
            except Exception as err:
                failures.append(err)

        return call

    writers = [
        (engine.checkpoint_engine, "save"),
        (engine.checkpoint_engine, "makedirs"),  # else torch.save's "parent directory does not exist" hides why
        (engine, "_copy_recovery_script"),  # rank 0 copies two scripts
        (shutil, "copytree"),  # NVMe-offloaded optimizer state: imported from shutil at the call
    ]
    patched = [(obj, name, vars(obj).get(name)) for obj, name in writers if hasattr(obj, name)]
    for obj, name, _ in patched:
        setattr(obj, name, deferred(getattr(obj, name)))
    try:
        yield failures
    finally:
        for obj, name, own in patched:
            if own is None:
                delattr(obj, name)  # the class's method again
            else:
                setattr(obj, name, own)


def _checkpoint_failure(failure: str, final: Path, needed: int | None) -> str:
    """The message for the whole checkpoint: a full disk is reported for the folder, with what the
    last checkpoint took and what is free once the partial one is removed."""
    earlier = "the earlier checkpoints are intact" if list_checkpoints(final.parent) else "nothing else changed"
    kept = f"{final.name} was not written and {earlier}"
    if failure.startswith(_NO_SPACE_MARK):
        return str(write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), final, needed, kept))
    return f"{failure} ({kept})"


def _expected_size(output_dir: Path) -> int | None:
    """About what the next checkpoint needs: the size of the newest one (``None`` before the first)."""
    found = list_checkpoints(output_dir)
    return folder_size(found[-1]) if found else None


def rotate(output_dir: Path, limit: int | None, newest: Path, protect: Path | None = None) -> None:
    """Keep at most ``limit`` checkpoints: delete the oldest ones *before* ``newest`` (the one just
    written, which always stays), never the one a run resumed from (``protect``)."""
    if limit is None:
        return
    newest_step = checkpoint_step(newest)
    older = [p for p in list_checkpoints(output_dir) if (checkpoint_step(p) or 0) < (newest_step or 0)]
    excess = len(older) - (limit - 1)
    for old in older:
        if excess <= 0:
            break
        if protect is not None and old.resolve() == protect.resolve():
            continue
        shutil.rmtree(old, ignore_errors=True)
        excess -= 1
        logger.info("removed old checkpoint %s", old)
