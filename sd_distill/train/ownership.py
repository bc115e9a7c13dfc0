"""Which folders a run may write into, checked before any model loads: only an empty folder or one
of sd-distill's own runs (never a repository, a model or another tool's output), a writable one, and
a ``--export_fused_pipeline`` target that is neither the base model, nor this run's folder, nor
anything else that is not an earlier fused export."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..constants import (
    CONFIG_FILE_NAME,
    GUIDANCE_PROJ_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    MODEL_CARD_NAME,
    STATE_FILE_NAME,
    SUMMARY_FILE_NAME,
)
from ..files import TEMP_MARK
from .checkpoint import checkpoint_step, list_checkpoints
from .config import TrainConfig

LOCK_NAME = ".sd-distill.lock"
ABANDONED_PREFIX = "abandoned-"  # outputs of a run that a resume from an earlier step left behind
# the outputs of an --overwrite_output_dir run that failed, the run it was replacing put back (a name,
# not a file in it: the disk may be full); renamed to a plain abandoned-* once a later run finishes
FAILED_REPLACEMENT_PREFIX = ABANDONED_PREFIX + "failed-overwrite-"
PREVIOUS_PREFIX = ".sd-distill-previous-"  # a run being replaced by --overwrite_output_dir
SHARED_TOKEN_PREFIX = ".sd-distill-shared-"  # the shared-disk check's token
CARD_TAG = "sd-distill"  # in our model card's front matter
_OUR_FILES = (LORA_WEIGHTS_NAME, GUIDANCE_PROJ_WEIGHTS_NAME, CONFIG_FILE_NAME, SUMMARY_FILE_NAME, LOCK_NAME)
_OUR_PATTERNS = re.compile(
    rf"^(checkpoint-\d+|\.checkpoint-\d+\.(tmp|old)|{ABANDONED_PREFIX}.+|{re.escape(PREVIOUS_PREFIX)}.+|"
    rf"{re.escape(SHARED_TOKEN_PREFIX)}.+|\..+{re.escape(TEMP_MARK)}\d+)$"
)
_SHOWN = 5  # foreign names listed in a message


def our_folders(config: TrainConfig) -> set[str]:
    """Top-level folders of ``output_dir`` this run writes: validation, the logs, the default cache."""
    out = Path(config.output_dir).resolve()
    names = {"validation"}
    for sub in (out / config.logging_dir, Path(config.cache_dir) if config.cache_dir else out / "cache"):
        rel = _relative_to(sub.resolve(), out)
        if rel is not None and rel.parts:
            names.add(rel.parts[0])
    return names


def is_ours(out: Path) -> bool:
    """A folder a run of this tool has written: its lock file, its config or a checkpoint of its own."""
    return (
        (out / LOCK_NAME).is_file()
        or _is_our_config(out / CONFIG_FILE_NAME)
        or any((p / STATE_FILE_NAME).is_file() for p in list_checkpoints(out))
    )


def foreign_entries(out: Path, config: TrainConfig) -> list[str]:
    """Names in ``out`` that are not this tool's outputs (everything, if the folder is not ours)."""
    names = sorted(os.listdir(out))
    if not names or not is_ours(out):
        return names
    folders = our_folders(config)
    return [n for n in names if not _our_name(out, n, folders)]


def _our_name(out: Path, name: str, folders: set[str]) -> bool:
    if name in _OUR_FILES or _OUR_PATTERNS.match(name):
        return True
    if name in folders:
        return (out / name).is_dir()
    return name == MODEL_CARD_NAME and is_our_card(out / name)


def is_our_card(path: Path) -> bool:
    """Our model card: front matter that names the sd-distill tag (a README.md of a repository does not)."""
    try:
        text = path.read_text(encoding="utf-8")[:2000]
    except (OSError, UnicodeDecodeError):
        return False
    head = text.split("\n---", 1)[0] if text.startswith("---") else ""
    return CARD_TAG in head


def _is_our_config(path: Path) -> bool:
    import json

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and {"pretrained_model_name_or_path", "lora_rank", "guidance_scale"} <= set(value)


def output_dir_errors(config: TrainConfig, resuming: bool) -> list[str]:
    """Refuse a folder that is not ours, not writable, or holds a run this one would overwrite or mix
    with; and sub-folders of ours that are files. Reads only."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        return [f"--output_dir {str(out)!r} is a file, not a folder; choose a folder for the run's outputs."]
    if not out.exists():
        return _parent_errors(out, "--output_dir")
    foreign = foreign_entries(out, config)
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else "")
        return [
            f"--output_dir {str(out)!r} holds files that are not sd-distill outputs ({shown}); a run writes only "
            f"into an empty folder or one of its own: choose another --output_dir (e.g. {str(out / 'run')!r})."
        ]
    errors = _probe_errors(out, "--output_dir")
    errors += [
        f"{str(out / name)!r} is a file; the run writes a folder of that name there."
        for name in sorted(our_folders(config))
        if (out / name).exists() and not (out / name).is_dir()
    ]
    return errors + _earlier_run_errors(config, out, resuming)


def side_folder_errors(config: TrainConfig) -> list[str]:
    """--cache_dir and --logging_dir are folders the run creates: neither may be a file."""
    out = Path(config.output_dir)
    side = [("--cache_dir", Path(config.cache_dir))] if config.cache_dir else []
    side.append(("--logging_dir", out / config.logging_dir))
    return [f"{flag} {str(path)!r} is a file; give a folder." for flag, path in side if path.is_file()]


def _earlier_run_errors(config: TrainConfig, out: Path, resuming: bool) -> list[str]:
    """A finished run or checkpoints of another run: only --resume_from_checkpoint or --overwrite_output_dir.
    (``latest`` on a finished run is decided once the schedule is known: resume.check_work_left.)"""
    if config.overwrite_output_dir or resuming:
        return []
    if (out / LORA_WEIGHTS_NAME).exists():
        return [
            f"--output_dir {str(out)!r} already holds a finished run; pass --overwrite_output_dir to replace it "
            "or choose another folder."
        ]
    if list_checkpoints(out):
        return [
            f"--output_dir {str(out)!r} has checkpoints of an earlier run; pass --resume_from_checkpoint latest "
            "to continue it or --overwrite_output_dir to start over."
        ]
    return []


def _parent_errors(path: Path, flag: str) -> list[str]:
    """A folder that does not exist yet: its nearest existing parent must be a writable folder."""
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        return [f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is not a folder."]
    return _probe_errors(parent, flag, created=path)


def _probe_errors(folder: Path, flag: str, created: Path | None = None) -> list[str]:
    """Writable? Create and remove a temporary file (permission bits do not tell, e.g. for root or a
    read-only mount)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".sd-distill-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        what = f"cannot be created in {str(folder)!r}" if created is not None else "is not writable"
        target = created if created is not None else folder
        return [f"{flag} {str(target)!r} {what}: {err.strerror or err}; choose a folder you can write to."]
    return []


def export_errors(config: TrainConfig) -> list[str]:
    """``--export_fused_pipeline``: never the base model, the output folder (or inside/above it), a
    folder the run fills, another run's folder, a file, or a non-empty folder other than an earlier
    fused export."""
    if not config.export_fused_pipeline:
        return []
    out = Path(config.output_dir)
    # the folders the run fills as it goes: empty (so allowed) now, deleted with an export swapped in later
    filled = [("--logging_dir", out / config.logging_dir)]
    filled += [(f"--{n}", Path(v)) for n in ("cache_dir", "trajectory_dir") if (v := getattr(config, n))]
    clashes = [("--output_dir", out)]
    if os.path.exists(config.pretrained_model_name_or_path):  # not a hub id
        clashes.append(("the base model --pretrained_model_name_or_path", Path(config.pretrained_model_name_or_path)))
    return export_target_errors("--export_fused_pipeline", Path(config.export_fused_pipeline), clashes, filled)


def export_target_errors(
    flag: str, target: Path, clashes: Sequence[tuple[str, Path]], filled: Sequence[tuple[str, Path]] = ()
) -> list[str]:
    """Where a fused export may go: not one of the ``clashes`` folders or inside/above one, not one of
    the ``filled`` folders or above it (inside is fine), not a file, and not a non-empty folder other
    than an earlier export of ours."""
    real = target.resolve()
    for what, other in clashes:
        other = other.resolve()
        if real == other or _relative_to(real, other) is not None or _relative_to(other, real) is not None:
            return [f"{flag} {str(target)!r} is {what} or inside/above it; export to a folder of its own."]
    for what, other in filled:
        other = other.resolve()
        if real == other or _relative_to(other, real) is not None:
            return [
                f"{flag} {str(target)!r} is {what} or above it, which the run fills; export to a folder of its own."
            ]
    if target.exists() and not target.is_dir():
        return [f"{flag} {str(target)!r} is a file; give a folder."]
    if not target.exists():
        return _parent_errors(target, flag)
    if not os.listdir(target) or is_fused_export(target):
        return _probe_errors(target.parent, flag)
    added = _added_to_export(target)
    if added:
        return [
            f"{flag} {str(target)!r} is an earlier export with {', '.join(added[:3])} added since, which replacing "
            "it would delete; export to a new folder (or move those out)."
        ]
    if is_ours(target):
        return [f"{flag} {str(target)!r} is another sd-distill run's folder; export to a folder of its own."]
    return [f"{flag} {str(target)!r} holds other files; export to a new or empty folder (or an earlier export)."]


def is_fused_export(folder: Path) -> bool:
    """What :func:`~.outputs.export_fused_pipeline` writes, and nothing else: a diffusers pipeline (its
    ``model_index.json`` and the component folders it names) with our config beside it. A file or folder
    added since (a git clone's ``.git``, a README) makes it the user's, not ours to replace."""
    return _added_to_export(folder) == []


def _added_to_export(folder: Path) -> list[str] | None:
    """The entries of an earlier fused export that it did not write; ``None`` if it is no export."""
    index = folder / "model_index.json"
    if not (index.is_file() and _is_our_config(folder / CONFIG_FILE_NAME)):
        return None
    try:
        components = {k for k in json.loads(index.read_text(encoding="utf-8")) if not k.startswith("_")}
    except (OSError, ValueError, AttributeError):
        return None
    ours = components | {"model_index.json", CONFIG_FILE_NAME, ".DS_Store"}  # macOS' folder notes are no one's
    return sorted(set(os.listdir(folder)) - ours)


def later_outputs(out: Path, step: int) -> list[Path]:
    """What an abandoned run wrote after ``step``: checkpoints and validation images of later steps."""
    later = [p for p in list_checkpoints(out) if (checkpoint_step(p) or 0) > step]
    validation = out / "validation"
    if validation.is_dir():
        later += [p for p in sorted(validation.iterdir()) if _step_folder(p.name) > step]
    return later


def _step_folder(name: str) -> int:
    m = re.match(r"^step-(\d+)$", name)
    return int(m.group(1)) if m else -1


def _relative_to(path: Path, root: Path) -> Path | None:
    try:
        return path.relative_to(root)
    except ValueError:
        return None
