"""Training configuration: one dataclass (each field's ``help`` is its flag's help), one check that
reports every problem at once, and the decisions taken from the data, all before any model loads."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..constants import DATA_SUFFIXES, DEFAULT_BASE_MODEL
from ..lora import DEFAULT_TARGET_MODULES
from ..options import build_parser as _build_parser
from ..options import option as _opt

# Caching is automatic up to this many rows: ~32 KiB of latents + ~160 KB of fp16 text embeddings
# per row at SD-2.1 sizes (512 px), so 20k rows stay within a few GB of RAM.
AUTO_CACHE_MAX_ROWS = 20_000


class ConfigError(ValueError):
    """Bad user input. The CLI prints the message (no traceback) and exits with status 2."""


@dataclass
class TrainConfig:
    # --- model -------------------------------------------------------------------------------
    pretrained_model_name_or_path: str = _opt(
        DEFAULT_BASE_MODEL, "Teacher pipeline: a hub id or a local diffusers folder."
    )
    revision: Optional[str] = _opt(None, "Hub revision (branch, tag or commit) of the model.")
    variant: Optional[str] = _opt(None, "Weight variant to load, e.g. 'fp16'.")
    output_dir: str = _opt("sd-distill-output", "Where checkpoints, the final LoRA and logs are written.")
    overwrite_output_dir: bool = _opt(False, "Allow writing into an output_dir that already holds a finished run.")
    seed: Optional[int] = _opt(42, "Seed for noise, timesteps, data order and augmentation (reproducible runs).")
    # --- distillation ------------------------------------------------------------------------
    guidance_scale: float = _opt(7.5, "Teacher CFG scale w distilled into the student: target = u + w(c - u).")
    teacher: str = _opt(
        "shared",
        "'shared': the teacher is the same UNet with the adapter disabled (one copy of the weights); "
        "'separate': a second frozen UNet as the seed recipe keeps (for comparison).",
        choices=("shared", "separate"),
    )
    loss: str = _opt("mse", "Distillation loss between student and teacher predictions.", choices=("mse", "huber"))
    huber_c: float = _opt(0.001, "Huber loss transition point (with --loss huber).")
    snr_gamma: Optional[float] = _opt(None, "Min-SNR weighting gamma (5.0 is usual); off when not given.")
    # --- LoRA --------------------------------------------------------------------------------
    lora_rank: int = _opt(4, "LoRA rank r.")
    lora_alpha: Optional[float] = _opt(None, "LoRA alpha (scale = alpha / r); defaults to the rank.")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA branch.")
    lora_target_modules: list[str] = _opt(
        DEFAULT_TARGET_MODULES, "UNet module names that get LoRA (the attention projections by default).", nargs="+"
    )
    # --- data --------------------------------------------------------------------------------
    dataset_name: Optional[str] = _opt(
        None, "A hub dataset id, a local dataset folder, or data files (.parquet/.arrow/.jsonl/.csv, globs allowed)."
    )
    dataset_config_name: Optional[str] = _opt(None, "Dataset configuration name, for hub datasets that have several.")
    train_data_dir: Optional[str] = _opt(
        None, "A local image folder with metadata.jsonl or metadata.csv (file_name + caption)."
    )
    image_column: Optional[str] = _opt(None, "Image column; detected ('image', 'img', ...) when not given.")
    caption_column: Optional[str] = _opt(
        None, "Caption column; detected ('text', 'prompt', 'caption', ...) when not given."
    )
    max_train_samples: Optional[int] = _opt(None, "Use only the first N rows (quick runs, debugging).")
    streaming: bool = _opt(False, "Stream the dataset instead of downloading/reading it whole (large sets).")
    caption_dropout: float = _opt(0.0, "Probability of replacing a caption with the empty prompt.")
    max_bad_fraction: float = _opt(
        0.1, "Stop with an error when more than this fraction of rows has an unreadable image."
    )
    resolution: int = _opt(512, "Training image size (multiple of 8); images are resized and cropped to it.")
    center_crop: bool = _opt(False, "Center-crop instead of random-crop.")
    random_flip: bool = _opt(False, "Randomly flip images horizontally.")
    default_prompt: str = _opt(
        "A man dancing", "Validation prompt used when --validation_prompts is not given (the seed's flag)."
    )
    # --- caching -----------------------------------------------------------------------------
    cache_latents: Optional[bool] = _opt(
        None,
        "Encode every image with the VAE once (crops are then drawn once). Default: on for map-style sets of at "
        f"most {AUTO_CACHE_MAX_ROWS} rows without --random_flip (a step took 0.74x the time, see BENCHMARKS.md).",
    )
    cache_text_embeddings: Optional[bool] = _opt(
        None,
        "Encode every caption with the text encoder once. "
        f"Default: on for map-style sets of at most {AUTO_CACHE_MAX_ROWS} rows.",
    )
    cache_dir: Optional[str] = _opt(None, "Where caches are stored (default: <output_dir>/cache).")
    # --- optimisation ------------------------------------------------------------------------
    train_batch_size: int = _opt(1, "Batch size per device.")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches accumulated per optimizer step.")
    max_train_steps: Optional[int] = _opt(None, "Total optimizer steps; overrides --num_train_epochs when given.")
    num_train_epochs: int = _opt(1, "Epochs, used when --max_train_steps is not given.")
    learning_rate: float = _opt(1e-4, "Peak learning rate of the LoRA parameters.")
    scale_lr: bool = _opt(False, "Multiply the learning rate by batch size x accumulation x number of processes.")
    lr_scheduler: str = _opt(
        "constant",
        "Learning-rate schedule.",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
    )
    lr_warmup_steps: int = _opt(0, "Warm-up steps of the schedule.")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_weight_decay: float = _opt(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm.")
    mixed_precision: Optional[str] = _opt(
        None, "'no', 'fp16' or 'bf16'; defaults to the accelerate config.", choices=("no", "fp16", "bf16")
    )
    gradient_checkpointing: bool = _opt(False, "Recompute UNet activations in the backward pass (less memory, slower).")
    allow_tf32: bool = _opt(False, "Allow TF32 matmuls on Ampere+ GPUs (faster).")
    dataloader_num_workers: int = _opt(0, "Data loading worker processes (0: load in the main process).")
    max_consecutive_nonfinite: int = _opt(5, "Stop when this many steps in a row have a non-finite loss.")
    # --- checkpoints -------------------------------------------------------------------------
    checkpointing_steps: int = _opt(500, "Write a checkpoint-<step> folder every N optimizer steps.")
    checkpoints_total_limit: Optional[int] = _opt(None, "Keep at most this many checkpoints (oldest removed first).")
    resume_from_checkpoint: Optional[str] = _opt(None, "A checkpoint folder, or 'latest' (the newest in output_dir).")
    save_on_interrupt: bool = _opt(False, "On SIGTERM/SIGINT write a checkpoint before exiting (preemptible nodes).")
    export_fused_pipeline: Optional[str] = _opt(
        None, "Also write a full pipeline with the LoRA fused into the UNet to this folder."
    )
    # --- validation and logging --------------------------------------------------------------
    validation_prompts: list[str] = _opt(
        (), "Prompts rendered by student (guidance 1) and teacher (guidance w) during training.", nargs="*"
    )
    validation_steps: int = _opt(500, "Render validation images every N optimizer steps (and at the end).")
    num_validation_inference_steps: int = _opt(25, "Sampling steps of validation images.")
    report_to: str = _opt("tensorboard", "Tracker: 'tensorboard', 'wandb', 'all' or 'none'.")
    logging_dir: str = _opt("logs", "Tracker log folder, relative to output_dir.")
    tracker_project_name: str = _opt("sd-distill", "Project name in the tracker.")

    # -----------------------------------------------------------------------------------------
    @property
    def prompts_for_validation(self) -> list[str]:
        return list(self.validation_prompts) or ([self.default_prompt] if self.default_prompt else [])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, allow_nan=False)


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per :class:`TrainConfig` field."""
    return _build_parser(
        TrainConfig, "Distill classifier-free guidance of a Stable Diffusion UNet into a LoRA adapter."
    )


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the CLI into a :class:`TrainConfig`; the run checks it (:func:`config_errors`) before any work."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))


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
    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    _check_values(config, need)
    _check_sources(config, need)
    return errors


Need = Callable[[bool, str], None]  # need(ok, message): records message unless ok


def _check_values(c: TrainConfig, need: Need) -> None:
    """Numbers out of range and settings that cannot go together."""
    for f in dataclasses.fields(c):  # NaN passes no comparison, and a config is recorded as strict JSON
        value = getattr(c, f.name)
        need(not isinstance(value, float) or math.isfinite(value), f"--{f.name} {value} is not a finite number.")
    need(
        c.resolution > 0 and c.resolution % 8 == 0,
        f"--resolution {c.resolution} is not a positive multiple of 8 (the VAE downsamples by 8); "
        f"try {max(8, round(c.resolution / 8) * 8)}.",
    )
    need(c.train_batch_size >= 1, f"--train_batch_size {c.train_batch_size} must be at least 1.")
    need(
        c.gradient_accumulation_steps >= 1,
        f"--gradient_accumulation_steps {c.gradient_accumulation_steps} must be at least 1.",
    )
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
    need(c.dataloader_num_workers >= 0, f"--dataloader_num_workers {c.dataloader_num_workers} must be 0 or more.")
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


def _check_sources(c: TrainConfig, need: Need) -> None:
    """Data, model and checkpoint paths that do not exist or are not what they should be."""
    need(
        c.dataset_name is not None or c.train_data_dir is not None,
        "no training data: give --dataset_name (hub id, folder or data files) "
        "or --train_data_dir (image folder with metadata.jsonl).",
    )
    need(
        c.dataset_name is None or c.train_data_dir is None, "give either --dataset_name or --train_data_dir, not both."
    )
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


def resolve_auto_cache(config: TrainConfig, num_rows: int | None) -> TrainConfig:
    """Turn the ``None`` (automatic) cache settings into decisions for a dataset of ``num_rows``
    rows (``None`` for a stream)."""
    small = num_rows is not None and num_rows <= AUTO_CACHE_MAX_ROWS
    latents = config.cache_latents if config.cache_latents is not None else small and not config.random_flip
    text = config.cache_text_embeddings if config.cache_text_embeddings is not None else small
    return dataclasses.replace(config, cache_latents=latents, cache_text_embeddings=text)


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
