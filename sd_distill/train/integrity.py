"""Is a checkpoint whole, and was it made by a launch like this one? Checked from the files alone
(present, not empty, JSON that parses, safetensors headers and torch archives that are complete),
before any model loads; and ``load_state`` failures turned into one line naming the file."""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

from ..constants import CONFIG_FILE_NAME, GUIDANCE_PROJ_WEIGHTS_NAME, LORA_WEIGHTS_NAME, STATE_FILE_NAME
from .collective import first_failure
from .config import ConfigError, checkpointed_objects

DEEPSPEED_FOLDER = "pytorch_model"  # accelerate's DeepSpeed save_state tag
_RNG_RE = re.compile(r"^random_states_(\d+)\.pkl$")
_SHARD_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")
# accelerate's file for the i-th object given to register_for_checkpointing (the weight average, a
# trajectory source): load_state reads every one, so a missing or cut one fails after the models load.
_CUSTOM_RE = re.compile(r"^custom_checkpoint_(\d+)\.pkl$")


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``ValueError`` says in a few words what is wrong with it."""
    raw = path.read_bytes()  # FileNotFoundError: the caller says "missing"
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    except json.JSONDecodeError:
        raise ValueError("is not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError("is not a JSON object")
    return value


def read_launch(path: Path) -> dict[str, Any]:
    """``training_state.json`` of checkpoint ``path`` (the step and the launch it was made under)."""
    return read_json_object(path / STATE_FILE_NAME)


def checkpoint_damage(path: Path) -> list[str]:
    """Files of checkpoint ``path`` that are missing, empty, truncated or unreadable."""
    problems = _json_problems(path / STATE_FILE_NAME, need_step=True) + _json_problems(path / CONFIG_FILE_NAME)
    problems += _safetensors_problems(path / LORA_WEIGHTS_NAME)
    if (path / GUIDANCE_PROJ_WEIGHTS_NAME).exists() or _saved_range(path):  # a w-conditioned student's
        problems += _safetensors_problems(path / GUIDANCE_PROJ_WEIGHTS_NAME)
    ranks = expected_processes(path)
    problems += _archive_problems([path / f"random_states_{i}.pkl" for i in range(ranks)])
    problems += _archive_problems([path / "scheduler.bin"])
    problems += custom_state_problems(path)
    if is_deepspeed_checkpoint(path):
        problems += _deepspeed_problems(path / DEEPSPEED_FOLDER, ranks)
    else:
        problems += _archive_problems([path / "optimizer.bin"])
    return problems


def is_deepspeed_checkpoint(path: Path) -> bool:
    return (path / DEEPSPEED_FOLDER).is_dir()


def expected_processes(path: Path) -> int:
    """How many processes wrote ``path``: recorded in training_state.json since it records it, else
    one RNG file per rank."""
    try:
        recorded = read_launch(path).get("num_processes")
    except (OSError, ValueError):
        recorded = None
    if isinstance(recorded, int) and recorded >= 1:
        return recorded
    found = [int(m.group(1)) for f in _names(path) if (m := _RNG_RE.match(f))]
    return max(found) + 1 if found else 1


def custom_state_problems(path: Path) -> list[str]:
    """accelerate's ``load_state`` needs exactly one whole file per object the run registers, and a
    resumed run registers what the checkpoint's own saved settings do (they must match): so exactly
    that many, whatever training_state.json records (older checkpoints record nothing)."""
    expected = _registered_by_saved_config(path)
    try:
        recorded = read_launch(path).get("custom_states", expected)
    except (OSError, ValueError):
        recorded = expected  # training_state.json's own problem is reported on its own
    if recorded != expected or isinstance(recorded, bool):
        return [f"training_state.json records {recorded!r} registered-object files, its settings make {expected}"]
    problems = _archive_problems([path / f"custom_checkpoint_{i}.pkl" for i in range(expected)])
    extra = sorted(int(m.group(1)) for f in _names(path) if (m := _CUSTOM_RE.match(f)) and int(m.group(1)) >= expected)
    if extra:
        problems.append(
            f"custom_checkpoint_{extra[0]}.pkl is more than the {expected} registered-object file(s) this "
            "checkpoint was saved with"
        )
    return problems


def _saved_range(path: Path) -> bool:
    """Whether the checkpoint's saved settings train a student told w (so it must hold cond_proj)."""
    try:
        return read_json_object(path / CONFIG_FILE_NAME).get("guidance_scale_range") is not None
    except (OSError, ValueError):
        return False  # sd_distill_config.json's own problem is reported on its own


def _registered_by_saved_config(path: Path) -> int:
    try:
        saved = read_json_object(path / CONFIG_FILE_NAME)
    except (OSError, ValueError):
        return 0  # sd_distill_config.json's own problem is reported on its own
    return checkpointed_objects(saved.get("train_states"), saved.get("average_last_fraction"))


def count_custom_states(path: Path) -> int:
    """The registered objects' files ``save_state`` wrote into ``path``."""
    return sum(1 for f in _names(path) if _CUSTOM_RE.match(f))


def launch_mismatch(path: Path, deepspeed: bool, zero_stage: Any, num_processes: int, precision: str) -> list[str]:
    """How the launch that wrote ``path`` differs from this one, in words a user can act on."""
    was_ds = is_deepspeed_checkpoint(path)
    name = repr(str(path))
    if was_ds != deepspeed:
        return [
            f"checkpoint {name} was written {'with' if was_ds else 'without'} DeepSpeed and this run is "
            f"{'not ' if was_ds else ''}under DeepSpeed: resume it with the accelerate config it was made with."
        ]
    problems = []
    ranks = expected_processes(path)
    if ranks != num_processes:
        problems.append(
            f"checkpoint {name} was written by {ranks} process(es) and this run has {num_processes}: resume it "
            f"with {ranks} (each rank restores its own RNG state{', and its optimizer shard' if was_ds else ''})."
        )
    try:
        launch = read_launch(path)
    except (OSError, ValueError):
        return problems
    for key, now in (("zero_stage", zero_stage if deepspeed else None), ("mixed_precision", precision)):
        if key in launch and launch[key] != now:
            problems.append(f"checkpoint {name} was trained with {key} {launch[key]!r}, this run has {now!r}.")
    return problems


def load_state_or_error(accelerator: Any, path: Path, **kwargs: Any) -> None:
    """``accelerator.load_state(path)``; any failure, on any rank, becomes one ConfigError naming the
    file it was reading, raised on every rank."""
    failure = None
    try:
        accelerator.load_state(str(path), **kwargs)
    except Exception as err:  # torch, pickle, DeepSpeed and safetensors all raise their own types
        culprit = _file_in_traceback(err, path) or path
        text = _shortened(" ".join(str(err).split()))
        detail = f"{type(err).__name__}: {text}" if text else type(err).__name__
        failure = (
            f"could not resume from {str(path)!r}: {str(culprit)!r} is damaged or does not fit this run "
            f"({detail}); resume from an earlier checkpoint-<step> folder."
        )
    failure = first_failure(accelerator, failure)
    if failure is not None:
        raise ConfigError(failure)


def _file_in_traceback(err: BaseException, folder: Path) -> Path | None:
    """The file inside ``folder`` that the failing code was reading: the innermost frame holding a
    path to an existing file there (``torch.load(f)``, ``load_file(filename)``, ...)."""
    root = os.path.realpath(folder)
    tb, found = err.__traceback__, None
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, (str, Path)) and len(str(value)) < 4096:
                real = os.path.realpath(value)
                if real.startswith(root + os.sep) and os.path.isfile(real):
                    found = Path(value)
        tb = tb.tb_next
    return found


def _shortened(text: str, limit: int = 240) -> str:
    """``text`` whole when short, else cut at the last word boundary before ``limit``."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _json_problems(path: Path, need_step: bool = False) -> list[str]:
    try:
        value = read_json_object(path)
    except FileNotFoundError:
        return [f"{path.name} is missing"]
    except OSError as err:
        return [f"{path.name} cannot be read ({err.strerror})"]
    except ValueError as err:
        return [f"{path.name} {err}"]
    step = value.get("global_step")
    if need_step and not (isinstance(step, int) and step >= 0):
        return [f"{path.name} has no global_step"]
    return []


def _safetensors_problems(path: Path) -> list[str]:
    from safetensors import safe_open

    if not path.is_file():
        return [f"{path.name} is missing"]
    if path.stat().st_size == 0:
        return [f"{path.name} is empty"]
    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception:  # SafetensorError: the header is cut off or does not cover the file
        return [f"{path.name} is truncated or not a safetensors file"]
    return []


def _archive_problems(paths: list[Path]) -> list[str]:
    """torch.save files are zip archives: a cut-off one has no central directory at its end."""
    problems = []
    for path in paths:
        rel = path.name if path.parent.name != DEEPSPEED_FOLDER else f"{DEEPSPEED_FOLDER}/{path.name}"
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size == 0:
            problems.append(f"{rel} is empty")
        elif not zipfile.is_zipfile(path):
            problems.append(f"{rel} is truncated or damaged")
    return problems


def _deepspeed_problems(folder: Path, ranks: int) -> list[str]:
    """DeepSpeed writes one model-states file (ZeRO-3: one per rank) and one optimizer shard per rank."""
    names = _names(folder)
    shards = {
        kind: {int(m.group(1)) for f in names if (m := _SHARD_RE.search(f)) and m.group(2) == kind}
        for kind in ("optim", "model")
    }
    problems = []
    if not any(f.endswith("model_states.pt") for f in names):
        problems.append(f"{DEEPSPEED_FOLDER}/ has no model_states file")
    for kind, present in shards.items():
        if present:
            problems += [
                f"{DEEPSPEED_FOLDER}/ has no {kind} shard of rank {r}" for r in range(ranks) if r not in present
            ]
    problems += _archive_problems([folder / f for f in sorted(names) if f.endswith(".pt")])
    return problems
