"""``export_fused_pipeline.py``: the fused export of a finished training folder, after the fact (the
same export as training's ``--export_fused_pipeline``). Everything is checked before a model loads."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..constants import CONFIG_FILE_NAME, DTYPE_NAMES, HUB_ID, LORA_WEIGHTS_NAME
from .checkpoint import list_checkpoints
from .config import ConfigError
from .ownership import LOCK_NAME, export_target_errors
from .rundir import RunLock


class ExportError(ValueError):
    """Bad input to the export command: one line that says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Export:
    student: Path
    out: Path
    base: str
    revision: str | None
    variant: str | None
    dtype: str
    conditioned: bool  # told w (a --guidance_scale_range student), else fixed-w


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a trained student as a full pipeline, its LoRA fused in.")
    parser.add_argument("--student", required=True, help="A finished training folder (its --output_dir).")
    parser.add_argument("--out", required=True, help="The new pipeline folder (new, empty, or an earlier export).")
    parser.add_argument(
        "--base", default=None, help=f"Base model; default: the one recorded in the student's {CONFIG_FILE_NAME}."
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="fp32",
        help="Precision of the stored weights (fused in fp32 first). fp16 halves the folder; load it with "
        "torch_dtype=torch.float16.",
    )
    return parser


def resolve(argv: list[str] | None = None) -> Export:
    args = build_parser().parse_args(argv)
    student = Path(args.student)
    recorded = _student_config(student)
    recorded_base = recorded.get("pretrained_model_name_or_path")
    base = args.base or recorded_base
    if not isinstance(base, str) or not base:
        raise ExportError(f"{student / CONFIG_FILE_NAME} records no base model: pass --base")
    _check_base(base, from_record=args.base is None)
    same = base == recorded_base  # the recorded revision / variant describe the recorded base only
    clashes = [("--student", student)] + ([("the base model", Path(base))] if Path(base).exists() else [])
    errors = export_target_errors("--out", Path(args.out), clashes)
    if errors:
        raise ExportError(errors[0])
    return Export(
        student=student,
        out=Path(args.out),
        base=base,
        revision=_text(recorded.get("revision")) if same else None,
        variant=_text(recorded.get("variant")) if same else None,
        dtype=args.dtype,
        conditioned=bool(recorded.get("guidance_scale_range")),
    )


def _student_config(student: Path) -> dict[str, Any]:
    """The training config of a finished local training folder."""
    if not student.is_dir():
        what = "is a file" if student.exists() else "not found"
        raise ExportError(f"--student {str(student)!r}: {what}; give a finished training folder")
    if not (student / LORA_WEIGHTS_NAME).is_file():
        if (student / "model_index.json").is_file():
            raise ExportError(f"--student {str(student)!r} is a pipeline already (it has model_index.json)")
        done = list_checkpoints(student)
        hint = (
            f" it holds {done[-1].name}: the run has not finished; resume it with --resume_from_checkpoint latest"
            if done
            else " give the training's --output_dir"
        )
        raise ExportError(f"--student {str(student)!r} has no {LORA_WEIGHTS_NAME};{hint}")
    path = student / CONFIG_FILE_NAME
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"--student {str(student)!r} has no {CONFIG_FILE_NAME}: not an sd-distill training folder")
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read {path}: {err}") from None
    if not isinstance(recorded, dict):
        raise ExportError(f"{path} is not a JSON object")
    for key in ("pretrained_model_name_or_path", "revision", "variant"):
        if recorded.get(key) is not None and not isinstance(recorded[key], str):
            raise ExportError(f"{path} records {key} {recorded[key]!r}, not a string; fix it or pass --base")
    return recorded


def _check_base(base: str, from_record: bool) -> None:
    if Path(base).exists():
        if not (Path(base) / "model_index.json").is_file():
            raise ExportError(f"base model {base!r} has no model_index.json: not a diffusers pipeline folder")
        return
    hint = " (recorded by training as given, relative to where it ran)" if from_record else ""
    if not HUB_ID.match(base) or base.startswith("."):
        raise ExportError(f"base model folder not found: {base!r}{hint}; pass --base")
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(base, "model_index.json"), str):
        raise ExportError(
            f"base model {base!r} is no folder here{hint} and not in the hub cache, and HF_HUB_OFFLINE is set: "
            "pass --base, or go online"
        )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def how_to_load(export: Export) -> str:
    dtype = {"fp32": "", "fp16": ", torch_dtype=torch.float16", "bf16": ", torch_dtype=torch.bfloat16"}[export.dtype]
    scale = "guidance_scale=g" if export.conditioned else "guidance_scale=1"
    return f"StableDiffusionPipeline.from_pretrained({str(export.out)!r}{dtype})(prompt, {scale})"


def run(export: Export) -> Path:
    """The export, holding the student folder's run lock: no training starts (or goes on) in it meanwhile."""
    from ..models import torch_dtype
    from .export import export_fused_pipeline

    try:
        lock = RunLock.acquire(export.student)
    except ConfigError:
        holder = (export.student / LOCK_NAME).read_text(encoding="utf-8", errors="replace").strip()
        raise ExportError(
            f"--student {str(export.student)!r} is in use by a training run ({holder}); export once it has finished"
        ) from None
    try:
        return export_fused_pipeline(
            export.base, export.student, str(export.out), export.revision, export.variant, torch_dtype(export.dtype)
        )
    except OSError as err:  # the export turns every failed write into OutputWriteError: this is the base's load
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"cannot load the base model {export.base!r}: {first}; pass --base") from None
    finally:
        lock.release()
