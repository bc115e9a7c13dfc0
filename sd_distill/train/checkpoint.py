"""``checkpoint-<step>`` folders: written atomically by every rank, found, rotated, checked.

A checkpoint holds the LoRA adapter (safetensors), the optimizer/scheduler/RNG state that
``accelerator.save_state`` writes (under DeepSpeed without the frozen base weights), the step
and the resolved training config. It is written to a hidden temporary folder and renamed when
complete, so ``latest`` never picks a half-written one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..constants import CONFIG_FILE_NAME, STATE_FILE_NAME
from ..lora import adapter_metadata, lora_state_dict, save_lora
from .config import ConfigError

logger = logging.getLogger(__name__)

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Settings a checkpoint's optimizer state and adapter depend on: resuming with others is an error.
_MUST_MATCH = ("pretrained_model_name_or_path", "lora_rank", "lora_target_modules", "teacher")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(config: Any) -> Path | None:
    """The checkpoint to resume from (``None`` to start fresh); raises ConfigError if it is unusable."""
    if config.resume_from_checkpoint is None:
        return None
    if config.resume_from_checkpoint == "latest":
        found = list_checkpoints(config.output_dir)
        if not found:
            logger.info("no checkpoint in %s yet; starting from step 0", config.output_dir)
            return None
        path = found[-1]
    else:
        path = Path(config.resume_from_checkpoint)
    check_compatible(path, config)
    return path


def check_compatible(path: Path, config: Any) -> None:
    state_file, config_file = path / STATE_FILE_NAME, path / CONFIG_FILE_NAME
    if not state_file.is_file() or not config_file.is_file():
        raise ConfigError(
            f"--resume_from_checkpoint {str(path)!r} is not an sd-distill checkpoint (no {STATE_FILE_NAME}); "
            "give a checkpoint-<step> folder or 'latest'."
        )
    saved = json.loads(config_file.read_text())
    mismatches = [
        f"{key}: checkpoint has {saved.get(key)!r}, this run has {getattr(config, key)!r}"
        for key in _MUST_MATCH
        if _norm(saved.get(key)) != _norm(getattr(config, key))
    ]
    if mismatches:
        raise ConfigError(
            f"checkpoint {str(path)!r} was made with other settings; "
            "resume with the same ones or start a new --output_dir:\n  - " + "\n  - ".join(mismatches)
        )


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def read_step(path: Path) -> int:
    return int(json.loads((path / STATE_FILE_NAME).read_text())["global_step"])


def deepspeed_engine(accelerator: Any) -> Any:
    """The DeepSpeed engine of a prepared run (``None`` without DeepSpeed): it holds the fp32 master
    weights that are saved instead of its bf16/fp16 module copy."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return None if wrapped is None else wrapped.engine


def save_checkpoint(accelerator: Any, unet: Any, config: Any, step: int, protect: Path | None = None) -> Path:
    """Write ``checkpoint-<step>``; every rank must call this (DeepSpeed saves collectively)."""
    from accelerate.utils import DistributedType

    output_dir = Path(config.output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a run killed mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    kwargs = {"exclude_frozen_parameters": True} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
    accelerator.save_state(str(tmp), **kwargs)
    lora = lora_state_dict(unet, deepspeed_engine(accelerator))  # collective under DeepSpeed
    if accelerator.is_main_process:
        save_lora(lora, tmp, adapter_metadata(unet))
        (tmp / CONFIG_FILE_NAME).write_text(config.to_json())
        (tmp / STATE_FILE_NAME).write_text(json.dumps({"global_step": step}))
        _fsync_tree(tmp)
        if final.exists():  # same step written again (e.g. a run resumed and killed before moving on)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        rotate(output_dir, config.checkpoints_total_limit, protect)
        logger.info("saved %s (%.2f MB)", final, _size_mb(final))
    accelerator.wait_for_everyone()
    return final


def rotate(output_dir: Path, limit: int | None, protect: Path | None) -> None:
    """Delete the oldest checkpoints beyond ``limit``, never the one a run resumed from."""
    if limit is None:
        return
    found = list_checkpoints(output_dir)
    for old in found[: max(0, len(found) - limit)]:
        if protect is not None and old.resolve() == protect.resolve():
            continue
        shutil.rmtree(old, ignore_errors=True)
        logger.info("removed old checkpoint %s", old)


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
