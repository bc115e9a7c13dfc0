"""Settings that the launch (``accelerate launch`` and its yaml, or a DeepSpeed json) and the flags
both give: resolved into one value before the accelerator exists, or refused when they disagree.

accelerate lets the environment win over ``Accelerator(gradient_accumulation_steps=...)`` and fills
a json's ``"auto"`` clipping with its own 1.0, while this recipe counts steps, scales the learning
rate and resumes with its own values, so a silent override would train something else than asked.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import TrainConfig

DEFAULT_ACCUMULATION = 1
DEFAULT_MAX_GRAD_NORM = 1.0


def _yaml_or_launcher(field: str, environ: Mapping[str, str]) -> str:
    from_yaml = field in environ.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")
    return f"the accelerate config's deepspeed_config.{field}" if from_yaml else f"accelerate launch --{field}"


def _json_value(environ: Mapping[str, str], key: str) -> Any:
    """``key`` of the DeepSpeed json the launch names (``None`` when absent or "auto")."""
    path = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none" or not Path(path).is_file():
        return None
    try:
        value = json.loads(Path(path).read_text()).get(key)
    except (OSError, ValueError):
        return None  # accelerate reports an unreadable json itself
    return None if value == "auto" else value


def _given_by_launch(environ: Mapping[str, str], env_name: str, json_key: str, field: str) -> list[tuple[float, str]]:
    """Every value the launch gives for one setting, each with where it comes from."""
    found: list[tuple[float, str]] = []
    if environ.get(env_name) not in (None, "", "none", "auto"):
        found.append((float(environ[env_name]), _yaml_or_launcher(field, environ)))
    value = _json_value(environ, json_key)
    if value is not None:
        found.append((float(value), f"{json_key} in {environ['ACCELERATE_DEEPSPEED_CONFIG_FILE']}"))
    return found


def _resolve(
    flag: str, given: float | None, launch: list[tuple[float, str]], default: float, errors: list[str]
) -> float:
    """The one value: the flag's and the launch's when they agree, whichever is given, else ``default``."""
    values = {v for v, _ in launch} | ({given} if given is not None else set())
    if len(values) > 1:
        where = "; ".join(f"{src} says {v:g}" for v, src in launch)
        shown = f"{flag} {given:g}" if given is not None else f"{flag} (not given)"
        errors.append(
            f"{shown} conflicts with the launch: {where}. accelerate would silently use the launch's value; "
            f"make them agree, or delete the setting from the accelerate config / json and pass {flag}."
        )
        return given if given is not None else launch[0][0]
    return next(iter(values)) if values else default


def resolve_launch(config: TrainConfig, environ: Mapping[str, str] = os.environ) -> tuple[TrainConfig, list[str]]:
    """``config`` with accumulation and clipping decided, and the conflicts found."""
    errors: list[str] = []
    try:
        accumulation = _given_by_launch(
            environ,
            "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
            "gradient_accumulation_steps",
            "gradient_accumulation_steps",
        )
        clipping = _given_by_launch(environ, "ACCELERATE_GRADIENT_CLIPPING", "gradient_clipping", "gradient_clipping")
        micro_batch = _json_value(environ, "train_micro_batch_size_per_gpu")
    except ValueError as err:
        return config, [f"the launch gives a setting that is not a number: {err}"]
    steps = _resolve(
        "--gradient_accumulation_steps", config.gradient_accumulation_steps, accumulation, DEFAULT_ACCUMULATION, errors
    )
    norm = _resolve("--max_grad_norm", config.max_grad_norm, clipping, DEFAULT_MAX_GRAD_NORM, errors)
    if micro_batch is not None and int(micro_batch) != config.train_batch_size:
        errors.append(
            f"--train_batch_size {config.train_batch_size} conflicts with train_micro_batch_size_per_gpu "
            f'{micro_batch} in the DeepSpeed json; set it to "auto" or make them agree.'
        )
    return dataclasses.replace(config, gradient_accumulation_steps=int(steps), max_grad_norm=float(norm)), errors


def apply_to_deepspeed(accelerator: Any, config: TrainConfig) -> None:
    """Write the resolved clipping into DeepSpeed's config where it is still "auto" (accelerate would
    put its own 1.0 there at ``prepare``); accumulation "auto" is filled from the accelerator."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.deepspeed_config.get("gradient_clipping", "auto") == "auto":
        plugin.deepspeed_config["gradient_clipping"] = config.max_grad_norm


def check_prepared(accelerator: Any, engine: Any, config: TrainConfig) -> None:
    """After ``prepare``: what DeepSpeed and accelerate really use is what the run counts with."""
    from .loop import TrainingError

    used = {"gradient accumulation": (accelerator.gradient_accumulation_steps, config.gradient_accumulation_steps)}
    if hasattr(engine, "gradient_clipping"):  # a DeepSpeed engine
        used["DeepSpeed gradient accumulation"] = (
            engine.gradient_accumulation_steps(),
            config.gradient_accumulation_steps,
        )
        used["DeepSpeed gradient clipping"] = (engine.gradient_clipping(), config.max_grad_norm)
        used["DeepSpeed micro-batch"] = (engine.train_micro_batch_size_per_gpu(), config.train_batch_size)
    wrong = [f"{name}: {got} (the run counts with {want})" for name, (got, want) in used.items() if got != want]
    if wrong:
        raise TrainingError("accelerate/DeepSpeed changed settings after start-up: " + "; ".join(wrong))
