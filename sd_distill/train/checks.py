"""Every check of a run's flags that needs no model and no data, each problem one message, all
reported together (``config_errors``); what the accelerator, the data and the output folder reveal
is checked in the recipe's preflight and added to the same message."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path

from ..constants import DATA_SUFFIXES, DEFAULT_BASE_MODEL
from .config import GUIDANCE_OPTIONS_OFF, WARMUP_STABLE_DECAY, ConfigError, TrainConfig
from .schedule import decay_steps


def validate(config: TrainConfig) -> None:
    """Raise one :class:`ConfigError` listing every problem :func:`config_errors` finds."""
    raise_if_any(config_errors(config))


def raise_if_any(errors: list[str]) -> None:
    """One problem: its message; several: a list of them."""
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError("invalid arguments:\n  - " + "\n  - ".join(errors))


def config_errors(config: TrainConfig) -> list[str]:
    """Everything that can be checked without loading a model or data, as one message each."""
    nonfinite = _nonfinite_flags(config)
    errors = [_nonfinite_message(name, getattr(config, name)) for name in nonfinite]

    def need(ok: bool, message: str) -> None:
        # a NaN or inf flag is said once, above: its own range check would only say it again
        if not ok and not any(message.startswith(f"--{name} ") for name in nonfinite):
            errors.append(message)

    _check_values(config, need)
    _check_optimiser(config, need)
    _check_loop(config, need)
    _check_sources(config, need)
    _check_states(config, need)
    _check_outputs(config, need)
    return errors


Need = Callable[[bool, str], None]  # need(ok, message): records message unless ok


def _nonfinite_flags(c: TrainConfig) -> list[str]:
    """NaN or inf in a float flag (or in a list of them) would pass a range check written as ``not x < 0``."""
    return [f.name for f in dataclasses.fields(c) if any(_nonfinite(v) for v in _values(getattr(c, f.name)))]


def _values(value: object) -> list[object]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _nonfinite(value: object) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _nonfinite_message(name: str, value: object) -> str:
    words = " ".join(map(str, _values(value)))
    what = "holds a value that is not" if isinstance(value, (list, tuple)) else "is not"
    return f"--{name} {words} {what} a finite number."


def _check_decay(c: TrainConfig, need: Need) -> None:
    """The decay of a warm-up/stable/decay schedule: a fraction of the run that leaves room for the warm-up."""
    if c.lr_decay_fraction is None:
        return
    if c.lr_scheduler != WARMUP_STABLE_DECAY:
        need(
            False,
            f"--lr_decay_fraction applies to --lr_scheduler {WARMUP_STABLE_DECAY} only (this run: {c.lr_scheduler}).",
        )
        return
    if not 0 < c.lr_decay_fraction <= 1:
        need(False, f"--lr_decay_fraction {c.lr_decay_fraction} must be in (0, 1] (0.2: the last fifth of the steps).")
    elif c.max_train_steps:
        error = decay_fit_error(c, c.max_train_steps)
        need(error is None, error or "")


def decay_fit_error(c: TrainConfig, max_steps: int) -> str | None:
    """Why the warm-up and the decay do not fit in a run of ``max_steps`` steps (``None``: they do, or
    there is no decay). ``c`` has passed :func:`_check_decay`'s range check."""
    if c.lr_scheduler != WARMUP_STABLE_DECAY or c.lr_decay_fraction is None:
        return None
    decay = decay_steps(max_steps, c.lr_decay_fraction)
    if c.lr_warmup_steps + decay <= max_steps:
        return None
    return (
        f"--lr_warmup_steps {c.lr_warmup_steps} and the decay ({decay} steps, --lr_decay_fraction "
        f"{c.lr_decay_fraction}) do not fit in the run's {max_steps} steps: shorten one of them."
    )


def _check_optimiser(c: TrainConfig, need: Need) -> None:
    """AdamW, clipping, warm-up and the seed: what torch or numpy would reject only mid-setup."""
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(c, name)
        need(0 <= value < 1, f"--{name} {value} must be in [0, 1) (AdamW's decay rates; 0.9 and 0.999 are usual).")
    # zero epsilon divides 0 by 0 for LoRA's A weights, whose gradients start at zero (B starts at zero)
    need(c.adam_epsilon > 0, f"--adam_epsilon {c.adam_epsilon} must be positive (1e-8 is usual).")
    need(c.adam_weight_decay >= 0, f"--adam_weight_decay {c.adam_weight_decay} must be 0 or more.")
    need(c.lr_warmup_steps >= 0, f"--lr_warmup_steps {c.lr_warmup_steps} must be 0 or more.")
    _check_decay(c, need)
    need(
        c.average_last_fraction is None or 0 <= c.average_last_fraction < 1,
        f"--average_last_fraction {c.average_last_fraction} must be in [0, 1) (0.2: the mean of the last fifth "
        "of the steps; 0: off).",
    )
    need(c.huber_c > 0, f"--huber_c {c.huber_c} must be positive.")
    need(c.lora_alpha is None or c.lora_alpha > 0, f"--lora_alpha {c.lora_alpha} must be positive.")
    need(
        c.max_consecutive_nonfinite >= 1,
        f"--max_consecutive_nonfinite {c.max_consecutive_nonfinite} must be at least 1.",
    )
    need(
        c.num_validation_inference_steps >= 1,
        f"--num_validation_inference_steps {c.num_validation_inference_steps} must be at least 1.",
    )
    need(
        c.seed is None or 0 <= c.seed < 2**32,
        f"--seed {c.seed} must be in [0, 2**32) (numpy's seed range; the data order and crops use it too).",
    )


def _check_outputs(c: TrainConfig, need: Need) -> None:
    """Folders the run writes into: found to be files only at the first save otherwise."""
    for flag, value in (("--output_dir", c.output_dir), ("--cache_dir", c.cache_dir)):
        if value is not None:
            need(not Path(value).exists() or Path(value).is_dir(), f"{flag} {value!r} is a file, not a folder.")
    need(
        c.export_fused_pipeline is not None or c.export_dtype == "fp32",
        f"--export_dtype {c.export_dtype} applies to --export_fused_pipeline only; add it or drop --export_dtype.",
    )
    if c.export_fused_pipeline is not None:
        export = Path(c.export_fused_pipeline)
        need(
            not export.exists() or export.is_dir(),
            f"--export_fused_pipeline {str(export)!r} is a file, not a folder.",
        )
        need(
            export.resolve() != Path(c.output_dir).resolve(),
            "--export_fused_pipeline must be another folder than --output_dir (the LoRA folder).",
        )


def _check_values(c: TrainConfig, need: Need) -> None:
    """Numbers out of range and settings that cannot go together."""
    need(
        c.resolution > 0 and c.resolution % 8 == 0,
        f"--resolution {c.resolution} is not a positive multiple of 8 (the VAE downsamples by 8); "
        f"try {max(8, round(c.resolution / 8) * 8)}.",
    )
    need(c.train_batch_size >= 1, f"--train_batch_size {c.train_batch_size} must be at least 1.")
    need(
        c.max_train_steps is None or c.max_train_steps >= 1,
        f"--max_train_steps {c.max_train_steps} must be at least 1.",
    )
    need(c.num_train_epochs >= 1, f"--num_train_epochs {c.num_train_epochs} must be at least 1.")
    need(c.learning_rate > 0, f"--learning_rate {c.learning_rate} must be positive.")
    need(c.lora_rank >= 1, f"--lora_rank {c.lora_rank} must be at least 1.")
    need(0 <= c.lora_dropout < 1, f"--lora_dropout {c.lora_dropout} must be in [0, 1).")
    need(0 <= c.caption_dropout <= 1, f"--caption_dropout {c.caption_dropout} must be in [0, 1].")
    need(0 <= c.max_bad_fraction <= 1, f"--max_bad_fraction {c.max_bad_fraction} must be in [0, 1].")
    need(
        c.guidance_scale >= 1,
        f"--guidance_scale {c.guidance_scale} below 1 is not classifier-free guidance; the seed and SD use 7.5.",
    )
    if c.guidance_scale_range is not None:
        low, high = c.guidance_scale_range
        need(1 <= low < high, f"--guidance_scale_range {low:g} {high:g} must satisfy 1 <= W_MIN < W_MAX (e.g. 2 12).")
    for flag, off in GUIDANCE_OPTIONS_OFF.items():
        value = getattr(c, flag)
        need(
            c.guidance_scale_range is not None or value == off,
            f"--{flag} {value} applies to a student told w; add --guidance_scale_range W_MIN W_MAX or drop it.",
        )
    # below 4 the embedding's frequencies divide by zero (dim // 2 - 1): every feature NaN
    need(c.guidance_embedding_dim >= 4, f"--guidance_embedding_dim {c.guidance_embedding_dim} must be at least 4.")
    fresh = _starts_afresh(c)  # a run resumed goes on as it began (resume compares its settings instead)
    for flag, default in (("guidance_scale_sampling", "uniform"), ("guidance_embedding_dim", 256)):
        value = getattr(c, flag)
        need(
            not fresh or c.guidance_scale_range is not None or value == default,
            f"--{flag} {value} applies to a student told w; add --guidance_scale_range W_MIN W_MAX or drop it.",
        )
    if c.guidance_scale_range is not None and fresh:
        low, high = c.guidance_scale_range
        need(
            not low <= high or low <= c.guidance_scale <= high,
            f"--guidance_scale {c.guidance_scale:g} (the scale of the validation images and the model card's "
            f"example) is outside --guidance_scale_range {low:g} {high:g}: pass a --guidance_scale inside it, "
            f"e.g. --guidance_scale {math.sqrt(low * high):.3g}.",
        )
    need(c.snr_gamma is None or c.snr_gamma > 0, f"--snr_gamma {c.snr_gamma} must be positive.")
    need(c.checkpointing_steps >= 1, f"--checkpointing_steps {c.checkpointing_steps} must be at least 1.")
    need(c.validation_steps >= 1, f"--validation_steps {c.validation_steps} must be at least 1.")
    need(
        c.checkpoints_total_limit is None or c.checkpoints_total_limit >= 1,
        f"--checkpoints_total_limit {c.checkpoints_total_limit} must be at least 1.",
    )
    need(
        c.max_train_samples is None or c.max_train_samples >= 1,
        f"--max_train_samples {c.max_train_samples} must be at least 1.",
    )
    need(
        c.dataloader_num_workers is None or c.dataloader_num_workers >= 0,
        f"--dataloader_num_workers {c.dataloader_num_workers} must be 0 or more.",
    )
    need(
        c.report_to in ("tensorboard", "wandb", "all", "none"),
        f"--report_to {c.report_to!r}: choose tensorboard, wandb, all or none.",
    )
    need(
        not (c.streaming and (c.cache_latents or c.cache_text_embeddings)),
        "--streaming cannot be combined with --cache_latents/--cache_text_embeddings (a stream is read once); "
        "drop one.",
    )
    need(
        not c.streaming or c.max_train_steps is not None,
        "--streaming needs --max_train_steps (a stream has no known length, so epochs cannot be counted).",
    )


def _check_loop(c: TrainConfig, need: Need) -> None:
    """Accumulation, clipping, how often the ranks agree, and how long they wait for each other."""
    need(
        c.gradient_accumulation_steps is None or c.gradient_accumulation_steps >= 1,
        f"--gradient_accumulation_steps {c.gradient_accumulation_steps} must be at least 1.",
    )
    need(c.max_grad_norm is None or c.max_grad_norm >= 0, f"--max_grad_norm {c.max_grad_norm} must be 0 (off) or more.")
    need(c.logging_steps >= 1, f"--logging_steps {c.logging_steps} must be at least 1.")
    need(c.ddp_timeout >= 1, f"--ddp_timeout {c.ddp_timeout} must be at least 1 second.")


def _check_sources(c: TrainConfig, need: Need) -> None:
    """Data, model and checkpoint paths that do not exist or are not what they should be."""
    given = [f for f, v in (("--dataset_name", c.dataset_name), ("--train_data_dir", c.train_data_dir),
                            ("--prompts_file", c.prompts_file)) if v is not None]  # fmt: skip
    need(
        bool(given),
        "no training data: give --dataset_name (hub id, folder or data files) "
        "or --train_data_dir (image folder with metadata.jsonl)"
        + (", or --prompts_file (one prompt per line)." if c.trajectory_states else "."),
    )
    need(len(given) <= 1, f"give one of {', '.join(given)}, not several.")
    if c.prompts_file is not None:
        need(Path(c.prompts_file).is_file(), f"--prompts_file {c.prompts_file!r} is not a file.")
    if c.train_data_dir is not None:
        need(Path(c.train_data_dir).is_dir(), f"--train_data_dir {c.train_data_dir!r} is not a folder.")
    if c.dataset_name is not None and _looks_local(c.dataset_name):
        need(
            _local_data_exists(c.dataset_name),
            f"--dataset_name {c.dataset_name!r} looks like a local path but nothing is there.",
        )
    if _looks_local(c.pretrained_model_name_or_path):
        model = Path(c.pretrained_model_name_or_path)
        need(
            model.exists(),
            f"--pretrained_model_name_or_path {str(model)!r} does not exist; "
            f"give a local diffusers pipeline folder or a hub id such as {DEFAULT_BASE_MODEL}.",
        )
        need(
            not model.exists() or (model / "model_index.json").is_file(),
            f"--pretrained_model_name_or_path {str(model)!r} is not a diffusers pipeline folder "
            "(no model_index.json); save one with pipeline.save_pretrained().",
        )
        told = _told_guidance(model / "unet")
        need(told is None, told_guidance_error(str(model), told))
    if c.resume_from_checkpoint not in (None, "latest"):
        need(
            Path(c.resume_from_checkpoint).is_dir(),
            f"--resume_from_checkpoint {c.resume_from_checkpoint!r} is not a folder; "
            "give a checkpoint-<step> folder or 'latest'.",
        )
    if c.report_to in ("wandb", "all"):
        import importlib.util

        need(
            importlib.util.find_spec("wandb") is not None,
            f"--report_to {c.report_to} needs the wandb package: pip install wandb (or use tensorboard).",
        )


def _check_states(c: TrainConfig, need: Need) -> None:
    """Trajectory settings in range, and the image-only flags refused where no image is read."""
    for flag, value, low in (
        ("--trajectory_steps", c.trajectory_steps, 1),
        ("--trajectories_per_prompt", c.trajectories_per_prompt, 1),
        ("--trajectory_shard_size", c.trajectory_shard_size, 1),
        ("--trajectory_refresh_steps", c.trajectory_refresh_steps, 1),
        ("--student_pool_trajectories", c.student_pool_trajectories, 1),
    ):
        need(value >= low, f"{flag} {value} must be at least {low}.")
    need(c.trajectory_steps <= 1000, f"--trajectory_steps {c.trajectory_steps} must be at most 1000.")
    need(
        0.0 <= c.student_state_fraction <= 1.0,
        f"--student_state_fraction {c.student_state_fraction} must be between 0 and 1.",
    )
    if c.trajectory_dir is not None:
        folder = Path(c.trajectory_dir)
        need(not folder.is_file(), f"--trajectory_dir {c.trajectory_dir!r} is a file; give a folder.")
        need(
            not folder.is_dir() or not any(folder.iterdir()) or (folder / "buffer.json").is_file(),
            f"--trajectory_dir {c.trajectory_dir!r} holds files that are not a trajectory buffer; give a new "
            "or empty folder (or one an earlier run's buffer is in).",
        )
    if not c.trajectory_states:
        need(
            c.prompts_file is None,
            "--prompts_file trains on guided trajectories: add --train_states teacher_trajectories "
            "(or student_trajectories), or give a dataset with images.",
        )
        return
    for flag, value in (
        ("--streaming", c.streaming),
        ("--random_flip", c.random_flip),
        ("--cache_latents", c.cache_latents),
        ("--caption_dropout", c.caption_dropout > 0),
    ):
        need(
            not value,
            f"{flag} has no effect with --train_states {c.train_states} (no image is read and every stored "
            "target is its prompt's guided prediction); leave it out.",
        )


def _starts_afresh(c: TrainConfig) -> bool:
    """No checkpoint to resume: no --resume_from_checkpoint, or 'latest' with none in the output folder."""
    if c.resume_from_checkpoint is None:
        return True
    from .checkpoint import list_checkpoints  # what --resume_from_checkpoint latest picks from

    return c.resume_from_checkpoint == "latest" and not list_checkpoints(c.output_dir)


def told_guidance_error(model: str, dim: object) -> str:
    """A teacher whose UNet already has ``time_cond_proj_dim`` (checked from its folder, or once a hub one loads)."""
    return (
        f"--pretrained_model_name_or_path {model!r} has a UNet already told the guidance scale (time_cond_proj_dim="
        f"{dim}: an LCM or a fused sd-distill export), which stock diffusers samples without CFG, so it cannot be the "
        "teacher; give the plain base model."
    )


def _told_guidance(unet_folder: Path) -> int | None:
    """``time_cond_proj_dim`` of a local UNet folder's config (``None``: none, or no readable config)."""
    import json

    try:
        value = json.loads((unet_folder / "config.json").read_text(encoding="utf-8")).get("time_cond_proj_dim")
    except (OSError, ValueError, AttributeError):
        return None  # the loader reports a missing or broken UNet itself
    return value


def _looks_local(name: str) -> bool:
    """A hub id is 'name' or 'owner/name'; anything else (or an existing path) is a local path."""
    if os.path.exists(name):
        return True
    if "://" in name:  # hf://, s3://, https:// data files: remote, read by datasets/fsspec
        return False
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or "*" in name
        or Path(name).suffix in DATA_SUFFIXES
    )


def _local_data_exists(name: str) -> bool:
    import glob

    return os.path.exists(name) or bool(glob.glob(os.path.expanduser(name)))
