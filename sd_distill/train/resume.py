"""Resuming: which checkpoint (``latest`` skips a damaged newest one), whether this run's settings
fit it (:data:`RESUME_RULES`), whether there is anything left to train, and the settings a resumed
run takes from the command line rather than from the checkpoint (the learning rate)."""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any

from ..constants import LORA_WEIGHTS_NAME, SUMMARY_FILE_NAME
from .checkpoint import list_checkpoints, outside, read_step
from .config import GUIDANCE_OPTIONS_OFF, ConfigError, TrainConfig
from .integrity import checkpoint_damage, launch_mismatch, read_json_object
from .ownership import FAILED_REPLACEMENT_PREFIX, PREVIOUS_PREFIX

logger = logging.getLogger(__name__)

MATCH, HONOUR = "match", "honour"
# What a resumed run does with each setting. MATCH: it must equal the checkpoint's, since the adapter,
# the optimizer state, the data order or the noise draws depend on it (resuming with another value is
# refused, naming every difference). HONOUR: this run's value is used from the resumed step on.
RESUME_RULES: dict[str, str] = {
    # model and objective
    "pretrained_model_name_or_path": MATCH, "revision": MATCH, "variant": MATCH, "teacher": MATCH,
    "guidance_scale": MATCH, "loss": MATCH, "huber_c": MATCH, "snr_gamma": MATCH, "seed": MATCH,
    "lora_rank": MATCH, "lora_alpha": MATCH, "lora_dropout": MATCH, "lora_target_modules": MATCH,
    "guidance_scale_range": MATCH, "guidance_scale_sampling": MATCH, "guidance_embedding_dim": MATCH,
    "guidance_loss_weighting": MATCH, "guidance_embedding_features": MATCH,
    # data: which rows, in which order, how they are cropped, flipped, captioned and cached
    "dataset_name": MATCH, "dataset_config_name": MATCH, "train_data_dir": MATCH, "image_column": MATCH,
    "caption_column": MATCH, "max_train_samples": MATCH, "streaming": MATCH, "caption_dropout": MATCH,
    "resolution": MATCH, "center_crop": MATCH, "random_flip": MATCH,
    "cache_latents": MATCH, "cache_text_embeddings": MATCH,  # compared once "auto" is decided
    # training states: the buffer (its settings), the student pool's schedule and mix
    "train_states": MATCH, "prompts_file": MATCH, "trajectory_steps": MATCH, "trajectories_per_prompt": MATCH,
    "trajectory_shard_size": MATCH, "trajectory_refresh_steps": MATCH, "student_pool_trajectories": MATCH,
    "student_state_fraction": MATCH, "trajectory_dir": HONOUR,  # the buffer is found by its settings' hash
    # optimisation: the batch, the schedule's shape, and what the optimizer state restores anyway
    "train_batch_size": MATCH, "gradient_accumulation_steps": MATCH, "lr_scheduler": MATCH, "lr_decay_fraction": MATCH,
    "average_last_fraction": MATCH,
    "lr_warmup_steps": MATCH, "adam_beta1": MATCH, "adam_beta2": MATCH, "adam_weight_decay": MATCH,
    "adam_epsilon": MATCH, "mixed_precision": MATCH,  # the precision the run had (training_state.json)
    "learning_rate": HONOUR, "scale_lr": HONOUR,  # set on the optimizer and the schedule after loading
    "max_train_steps": HONOUR, "num_train_epochs": HONOUR,  # the schedule stretches to the new end
    "max_grad_norm": HONOUR, "gradient_checkpointing": HONOUR, "allow_tf32": HONOUR,
    "dataloader_num_workers": HONOUR, "max_consecutive_nonfinite": HONOUR, "max_bad_fraction": HONOUR,
    "logging_steps": HONOUR, "ddp_timeout": HONOUR,
    # where things go and what is written, when
    "output_dir": HONOUR, "overwrite_output_dir": HONOUR, "cache_dir": HONOUR, "checkpointing_steps": HONOUR,
    "checkpoints_total_limit": HONOUR, "resume_from_checkpoint": HONOUR, "save_on_interrupt": HONOUR,
    "export_fused_pipeline": HONOUR, "export_dtype": HONOUR, "validation_prompts": HONOUR, "default_prompt": HONOUR,
    "validation_steps": HONOUR, "num_validation_inference_steps": HONOUR, "report_to": HONOUR,
    "logging_dir": HONOUR, "tracker_project_name": HONOUR,
}  # fmt: skip
_DECIDED_LATER = ("cache_latents", "cache_text_embeddings")  # None (auto) until the data is read
_FROM_LAUNCH = ("mixed_precision",)  # compared with what the accelerator runs (integrity.launch_mismatch)
_PATHS = ("pretrained_model_name_or_path", "dataset_name", "train_data_dir", "prompts_file")


class RunComplete(Exception):
    """Nothing to do: the run in this output folder already finished. Not an error (exit status 0)."""


def pick_resume(config: TrainConfig, launch: dict[str, Any]) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (``None``: start fresh) and every reason it cannot be used.
    ``launch``: this run's ``deepspeed``, ``zero_stage``, ``num_processes`` and ``precision``."""
    if config.resume_from_checkpoint is None:
        return None, []
    if config.resume_from_checkpoint == "latest":
        ambiguous = _latest_after_a_failed_replacement(Path(config.output_dir))
        if ambiguous is not None:
            return None, [ambiguous]
        path, errors = _newest_complete(Path(config.output_dir))
        if path is None:
            return None, errors
    else:
        path = Path(config.resume_from_checkpoint)
        if not path.is_dir():
            return None, []  # config_errors already says it is not a folder
        errors = _damage_errors(path) or _elsewhere_errors(path, config)
        if errors:
            return None, errors
    errors = launch_mismatch(path, **launch) + compatibility_errors(path, config)
    return (None, errors) if errors else (path, [])


def _newest_complete(output_dir: Path) -> tuple[Path | None, list[str]]:
    """``latest``: the newest checkpoint that is whole; a damaged newer one is skipped with a warning."""
    found = list_checkpoints(output_dir)
    if not found:
        logger.info("no checkpoint in %s yet; starting from step 0", output_dir)
        return None, []
    for candidate in reversed(found):
        if not checkpoint_damage(candidate):
            if candidate != found[-1]:
                logger.warning(
                    "the newest checkpoint %s is incomplete or damaged (%s); resuming from %s, the newest complete one",
                    found[-1],
                    "; ".join(checkpoint_damage(found[-1])),
                    candidate,
                )
            return candidate, []
    return None, _damage_errors(
        found[-1],
        "no earlier checkpoint in the folder is complete either: restore the missing files, or start again "
        "with --overwrite_output_dir (or another --output_dir)",
    )


def _elsewhere_errors(path: Path, config: TrainConfig) -> list[str]:
    """A checkpoint from outside ``--output_dir`` continues a run that would mix with the one already
    there (its checkpoints, its finished LoRA): only --overwrite_output_dir, which sets that run aside
    whole, may do so."""
    out = Path(config.output_dir)
    if config.overwrite_output_dir or not outside(path, out):
        return []
    if finished_run(out) is None and not list_checkpoints(out) and not any(out.glob(PREVIOUS_PREFIX + "*")):
        return []
    return [
        f"--resume_from_checkpoint {str(path)!r} is not in --output_dir {str(out)!r}, which holds a run of its "
        "own: pass --overwrite_output_dir to replace that run (it is kept until the new LoRA is written), or "
        "choose another --output_dir."
    ]


def _damage_errors(path: Path, more: str = "resume from an earlier checkpoint-<step> folder") -> list[str]:
    problems = checkpoint_damage(path)
    if not problems:
        return []
    if len(problems) >= 4 and any("training_state.json is missing" in p for p in problems):
        return [
            f"--resume_from_checkpoint {str(path)!r} is not an sd-distill checkpoint (no training_state.json); "
            "give a checkpoint-<step> folder or 'latest'."
        ]
    return [f"checkpoint {str(path)!r} is incomplete or damaged ({'; '.join(problems)}); {more}."]


# Settings added after checkpoints were first written, with the behaviour those checkpoints had: an
# older checkpoint is compared as if it had saved them, so a resume cannot switch them on unseen.
_BEFORE_THEY_EXISTED: dict[str, Any] = {**GUIDANCE_OPTIONS_OFF, "lr_decay_fraction": None, "average_last_fraction": 0.0}


def compatibility_errors(path: Path, config: TrainConfig, names: tuple[str, ...] | None = None) -> list[str]:
    """One message listing every MATCH setting (or only ``names``) that differs from the checkpoint's."""
    saved = {**_BEFORE_THEY_EXISTED, **read_json_object(path / "sd_distill_config.json")}
    names = names or tuple(k for k, rule in RESUME_RULES.items() if rule == MATCH and k not in _FROM_LAUNCH)
    diffs = [
        f"{key}: checkpoint has {saved.get(key)!r}, this run has {getattr(config, key)!r}"
        + _way_back(key, saved.get(key))
        for key in names
        if key in saved
        and not (key in _DECIDED_LATER and getattr(config, key) is None)
        and not _same(key, saved, config)
    ]
    if not diffs:
        return []
    return [
        f"checkpoint {str(path)!r} was made with other settings; resume with the same ones or start a new "
        "--output_dir:\n    - " + "\n    - ".join(diffs)
    ]


def _way_back(key: str, value: Any) -> str:
    """The flag that gives a resumed run the checkpoint's ``value`` (a new default, e.g. averaging for a
    range student, would otherwise refuse a checkpoint made before it)."""
    if value is None:
        return f" (leave out --{key} to continue it)"
    if isinstance(value, bool):
        return f" (pass --{'' if value else 'no-'}{key} to continue it)"
    if isinstance(value, (list, tuple)):
        return f" (pass --{key} {shlex.join(map(str, value))} to continue it)" if value else ""
    if isinstance(value, (int, float, str)):  # --key=value: a value may start with '-'
        return f" (pass {shlex.quote(f'--{key}={value}')} to continue it)"
    return ""


def check_compatible(path: Path, config: TrainConfig, names: tuple[str, ...] | None = None) -> None:
    errors = _damage_errors(path) or compatibility_errors(path, config, names)
    if errors:
        raise ConfigError(errors[0])


def _same(key: str, saved: dict[str, Any], config: TrainConfig) -> bool:
    old, new = saved.get(key), getattr(config, key)
    if key == "lora_alpha":  # no alpha means alpha = rank
        old = saved.get("lora_rank") if old is None else old
        new = config.lora_rank if new is None else new
    if isinstance(old, (list, tuple)) or isinstance(new, (list, tuple)):
        return list(old or []) == list(new or [])
    if key in _PATHS and isinstance(old, str) and isinstance(new, str) and os.path.exists(new):
        return old == new or os.path.realpath(old) == os.path.realpath(new)
    return old == new


def finished_run(output_dir: Path) -> int | None:
    """The step a finished run in ``output_dir`` ended at (its LoRA and summary are there), else None."""
    if not (output_dir / LORA_WEIGHTS_NAME).is_file():
        return None
    try:
        summary = json.loads((output_dir / SUMMARY_FILE_NAME).read_text())
    except (OSError, ValueError):
        return None
    step = summary.get("global_step") if isinstance(summary, dict) else None
    return step if isinstance(step, int) and not summary.get("interrupted") else None


def check_work_left(config: TrainConfig, resume_from: Path | None, max_steps: int) -> None:
    """Refuse a resume past this run's end; with ``latest`` on a finished run raise RunComplete."""
    out = Path(config.output_dir)
    done = finished_run(out) if config.resume_from_checkpoint == "latest" else None
    if done is not None and done >= max_steps and (resume_from is None or read_step(resume_from) <= done):
        if done == max_steps:
            raise RunComplete(
                f"nothing to do: the run in {str(out)!r} already finished its {done} steps (LoRA: "
                f"{out / LORA_WEIGHTS_NAME}); nothing was changed. Raise --max_train_steps to train further."
            )
        raise ConfigError(
            f"the run in {str(out)!r} already went to step {done}, past --max_train_steps {max_steps}; "
            "raise --max_train_steps, or start over with --overwrite_output_dir."
        )
    if resume_from is not None and read_step(resume_from) > max_steps:
        raise ConfigError(
            f"checkpoint {str(resume_from)!r} is at step {read_step(resume_from)}, past this run's {max_steps} "
            "steps; raise --max_train_steps, or resume from an earlier checkpoint."
        )
    if resume_from is None and done is not None:
        raise ConfigError(
            f"--output_dir {str(out)!r} holds a finished run of {done} steps and no checkpoint to continue "
            "from; pass --overwrite_output_dir to start over or choose another folder."
        )


def _latest_after_a_failed_replacement(out: Path) -> str | None:
    """``latest`` in a folder whose finished run was put back when an ``--overwrite_output_dir`` run
    replacing it failed: "nothing to do" would hand out the old LoRA as if it were the new run's."""
    done = finished_run(out)
    failed = _failed_replacement(out) if done is not None else None
    if failed is None:
        return None
    own = list_checkpoints(out)
    other = (
        f"; to train the finished run further: raise --max_train_steps, with --resume_from_checkpoint "
        f"{shlex.quote(str(own[-1]))}"
        if own
        else ""
    )
    return (
        f"--resume_from_checkpoint latest: the run in {str(out)!r} finished its {done} steps, but an "
        f"--overwrite_output_dir run that was replacing it failed and left {str(failed)!r} (step {read_step(failed)}). "
        f"To go on with that run: --resume_from_checkpoint {shlex.quote(str(failed))} --overwrite_output_dir"
        f"{other}; to keep the finished run as it is, use its LoRA and leave out --resume_from_checkpoint."
    )


def _failed_replacement(out: Path) -> Path | None:
    """The newest whole checkpoint of the newest failed ``--overwrite_output_dir`` run whose outputs
    :meth:`~.rundir.RunDir.failed` set aside in ``out``."""
    for folder in sorted(out.glob(FAILED_REPLACEMENT_PREFIX + "*"), reverse=True):  # named by the time
        whole = [c for c in list_checkpoints(folder) if not checkpoint_damage(c)]
        if whole:
            return whole[-1]
    return None


def honour_learning_rate(lr_scheduler: Any, learning_rate: float) -> None:
    """After ``load_state``: the schedule goes on from this run's peak learning rate, at the point of
    *this* run's schedule it has reached. The optimizer comes back with the checkpoint's rate, which is
    wrong when the peak changed and when ``--max_train_steps`` did (a run that had decayed to 0 and is
    given more steps would take its next step at 0)."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    old = list(scheduler.base_lrs)
    if not all(abs(lr - learning_rate) <= 1e-12 * max(lr, learning_rate) for lr in old):
        logger.warning("learning rate: the checkpoint had %g, this run uses %g from here on", old[0], learning_rate)
    scheduler.base_lrs = [learning_rate] * len(old)
    # every schedule here is a LambdaLR: the rate at step k is base * lambda(k), as its own step computes it
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = learning_rate * factor(scheduler.last_epoch)
        group["initial_lr"] = learning_rate
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
