"""The fused export: a full diffusers pipeline with the student's LoRA fused into the UNet (and, for a
w-conditioned student, ``cond_proj`` with ``time_cond_proj_dim`` in its config), which stock
``StableDiffusionPipeline.from_pretrained`` samples with no sd-distill import. Written beside its
target and renamed into place when complete, so an earlier export is replaced only by a whole one.
Where an export may go at all is :mod:`.ownership`'s question."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..conditioning import StudentFolderError, load_student
from ..constants import CONFIG_FILE_NAME, LORA_WEIGHTS_NAME
from ..files import (
    OutputWriteError,
    as_write_error,
    folder_size,
    fsync_dir,
    is_alive,
    remove_quietly,
    remove_stale_temps,
    temp_sibling,
)
from ..lora import lora_mismatch
from .ownership import is_fused_export

logger = logging.getLogger(__name__)


def export_fused_pipeline(
    base: str,
    lora_dir: Path,
    target: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: Any = None,
) -> Path:
    """Write the base with the student in ``lora_dir`` fused into its UNet to ``target``; fused in fp32,
    then stored in ``dtype`` (a torch dtype; ``None``: as loaded). A failed write (disk full) leaves an
    earlier export there as it was."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        base, revision=revision, variant=variant, safety_checker=None, requires_safety_checker=False
    )
    mismatch = lora_mismatch(pipe.unet, Path(lora_dir) / LORA_WEIGHTS_NAME)
    if mismatch is not None:
        raise StudentFolderError(
            f"the LoRA in {lora_dir} does not fit the base {base} ({mismatch}): export onto the base it was trained on"
        )
    load_student(pipe, lora_dir)  # cond_proj of a w-conditioned student; the LoRA with its alpha / r
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    if dtype is not None:
        pipe.to(dtype=dtype)
    final = Path(target)
    tmp = temp_sibling(final)
    if final.parent.is_dir():
        _recover_swap(final)  # an export killed between its two renames
        remove_stale_temps(final.parent, final.name)  # an export killed half-way
    if final.exists() and not (final.is_dir() and (not os.listdir(final) or is_fused_export(final))):
        # checked at start-up too; time has passed since, and the folder is the user's now
        raise OutputWriteError(
            f"{str(final)!r} now holds files that are not an earlier export, so it was left as it is; the "
            f"student is in {lora_dir} (python export_fused_pipeline.py --student {lora_dir} --out NEW exports it)"
        )
    remove_quietly(tmp)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.copy(lora_dir / CONFIG_FILE_NAME, tmp / CONFIG_FILE_NAME)
        _swap_in(tmp, final)
    except Exception as err:
        remove_quietly(tmp)
        failed = as_write_error(err, final, _export_bytes(pipe))
        if failed is None:
            raise
        raise failed from None
    logger.info("exported the fused pipeline to %s (%.0f MB)", final, folder_size(final) / 2**20)
    return final


# What an export holds besides the weights: mostly the tokenizer (CLIP's saves as 3.5 MB: vocab, merges and
# tokenizer.json), then a few configs. Without it the toy teacher's export was said to need 15.7 MB, not 19.
_TOKENIZER_AND_CONFIG_BYTES = 4 * 2**20


def _export_bytes(pipe: Any) -> int:
    """About what ``pipe.save_pretrained`` writes: every stored tensor (buffers too) and the small files."""
    tensors = [t for c in pipe.components.values() if hasattr(c, "state_dict") for t in c.state_dict().values()]
    return sum(t.numel() * t.element_size() for t in tensors) + _TOKENIZER_AND_CONFIG_BYTES


def _old_sibling(final: Path, pid: int) -> Path:
    return final.with_name(f".{final.name}.old-{pid}")


def _recover_swap(final: Path) -> None:
    """The earlier export a killed :func:`_swap_in` had moved aside: back in place if nothing took it,
    else removed (the new one did)."""
    for old in final.parent.glob(f".{final.name}.old-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or is_alive(int(pid)):
            continue
        if final.exists():
            remove_quietly(old)
        else:
            os.replace(old, final)


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``; an earlier export there goes only once that worked."""
    old = _old_sibling(final, os.getpid())
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old.exists():
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    remove_quietly(old)
