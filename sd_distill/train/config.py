"""Training configuration: one dataclass (each field's ``help`` is its flag's help), one check that
reports every problem at once, and the decisions taken from the data, all before any model loads."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional

from ..constants import DEFAULT_BASE_MODEL, DTYPE_NAMES
from ..guidance import GuidanceScales
from ..lora import DEFAULT_TARGET_MODULES, TIME_EMBEDDING_TARGET_MODULES
from ..options import build_parser as _build_parser
from ..options import option as _opt

# Caching is automatic up to this many rows: ~32 KiB of latents + ~160 KB of fp16 text embeddings
# per row at SD-2.1 sizes (512 px), so 20k rows stay within a few GB of RAM.
AUTO_CACHE_MAX_ROWS = 20_000

# Options of a student told w, by name: their "off" value (all a fixed-w student may have, and what
# checkpoints written before the options existed did).
GUIDANCE_OPTIONS_OFF = {"guidance_loss_weighting": "none", "guidance_embedding_features": "full"}
INVERSE_SQUARE, SMOOTH_FEATURES = "inverse_square", "smooth"
# Constant after the warm-up, then a linear fall to 0 over the last steps (transformers' WSD schedule).
WARMUP_STABLE_DECAY = "warmup_stable_decay"
DEFAULT_LR_DECAY_FRACTION = 0.2
DEFAULT_AVERAGE_FRACTION = 0.2  # a range student's decay window: the steps that settle it


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
    guidance_scale: float = _opt(
        7.5,
        "Teacher CFG scale w distilled into the student: target = u + w(c - u). With --guidance_scale_range, "
        "the scale validation images and the model card show.",
    )
    guidance_scale_range: Optional[list[float]] = _opt(
        None,
        "W_MIN W_MAX: one LoRA for every scale in the range. w is drawn per sample and the student is told it "
        "through the UNet's time_cond_proj_dim (as stock StableDiffusionPipeline passes guidance_scale), so it "
        "samples any guidance_scale in one pass per step. Without it: a fixed-w student at --guidance_scale.",
        nargs=2,
    )
    guidance_scale_sampling: str = _opt(
        "uniform",
        "How w is drawn in --guidance_scale_range: uniform in w, or uniform in log w (more of the low end; "
        "for a range reaching below about 3: on the toy teacher it halved the error at w = 2, BENCHMARKS.md).",
        choices=("uniform", "log"),
    )
    guidance_loss_weighting: Optional[str] = _opt(
        None,
        "With --guidance_scale_range: 'inverse_square' weights each sample's loss by 1/w^2 (mean 1 over the "
        "range), so the small targets of low scales count as much as the large ones of high scales; 'none': "
        "plain loss. Default: inverse_square with a range, none without.",
        choices=(GUIDANCE_OPTIONS_OFF["guidance_loss_weighting"], INVERSE_SQUARE),
    )
    guidance_embedding_dim: int = _opt(256, "Size of the guidance-scale embedding (time_cond_proj_dim; LCM uses 256).")
    guidance_embedding_features: str = _opt(
        GUIDANCE_OPTIONS_OFF["guidance_embedding_features"],
        "'smooth': cond_proj learns from the embedding's features that turn slowly with w only (the rest "
        "stay zero, so stock pipelines sample it unchanged); 'full': from all of them.",
        choices=(GUIDANCE_OPTIONS_OFF["guidance_embedding_features"], SMOOTH_FEATURES),
    )
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
    lora_target_modules: Optional[list[str]] = _opt(
        None,
        "UNet module names that get LoRA. Default: the attention projections, and with --guidance_scale_range "
        "also the time embedding (time_embedding.linear_1 linear_2), through which the student is told w.",
        nargs="+",
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
    # --- training states -------------------------------------------------------------------
    train_states: str = _opt(
        "images",
        "Where the states the student learns at come from. 'images': dataset images noised (the seed recipe). "
        "'teacher_trajectories': the states guided DDIM sampling of the teacher visits, from prompts alone, with "
        "the teacher's prediction stored (no teacher pass in the training step). 'student_trajectories': as "
        "teacher_trajectories, plus states the current student visits when it samples itself (on-policy).",
        choices=("images", "teacher_trajectories", "student_trajectories"),
    )
    prompts_file: Optional[str] = _opt(
        None, "A UTF-8 text file, one prompt per line, instead of a dataset (with --train_states *_trajectories)."
    )
    trajectory_steps: int = _opt(25, "DDIM steps of each guided trajectory; every visited state is a training row.")
    trajectories_per_prompt: int = _opt(1, "Trajectories (seeded noises) per prompt.")
    trajectory_dir: Optional[str] = _opt(
        None,
        "Where the trajectory buffer is kept: fp16 shards, reused by later runs of the same settings and resumed "
        "after a kill. Default: <cache_dir>/trajectories/<hash of its settings>.",
    )
    trajectory_shard_size: int = _opt(16, "Trajectories per buffer shard (also the generation batch per rank).")
    trajectory_refresh_steps: int = _opt(
        100, "With student_trajectories: the student walks a new pool of trajectories every N optimizer steps."
    )
    student_pool_trajectories: int = _opt(32, "With student_trajectories: trajectories in each pool (all ranks).")
    student_state_fraction: float = _opt(
        0.5, "With student_trajectories: share of each batch taken from the student's pool (the rest: the teacher's)."
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
    gradient_accumulation_steps: Optional[int] = _opt(
        None,
        "Micro-batches accumulated per optimizer step. Default: the accelerate config's "
        "deepspeed_config.gradient_accumulation_steps if it sets one, else 1; when both are given they must agree.",
    )
    max_train_steps: Optional[int] = _opt(None, "Total optimizer steps; overrides --num_train_epochs when given.")
    num_train_epochs: int = _opt(1, "Epochs, used when --max_train_steps is not given.")
    learning_rate: float = _opt(1e-4, "Peak learning rate of the LoRA parameters.")
    scale_lr: bool = _opt(False, "Multiply the learning rate by batch size x accumulation x number of processes.")
    lr_scheduler: Optional[str] = _opt(
        None,
        "Learning-rate schedule. Default: warmup_stable_decay with --guidance_scale_range (each batch mixes scales, "
        "so the updates stay noisy; a decay at the end settles them: on the toy teacher the error at w = 2 and 4 "
        "fell by 15 %, BENCHMARKS.md), constant without (a fixed-w student as before).",
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
        + (WARMUP_STABLE_DECAY,),
    )
    lr_decay_fraction: Optional[float] = _opt(
        None,
        f"With --lr_scheduler {WARMUP_STABLE_DECAY}: the last fraction of the steps, over which the learning rate "
        f"falls linearly to 0 (default {DEFAULT_LR_DECAY_FRACTION}).",
    )
    average_last_fraction: Optional[float] = _opt(
        None,
        "Save the mean of the weights over this last fraction of the steps instead of the last step's (0: off). "
        "Default: 0.2 with --guidance_scale_range (on the toy teacher the error at w = 2 fell by 18 %, "
        "BENCHMARKS.md session 8), 0 without. Validation images show the weights of their step; at the end, "
        "validation/step-<N>-mean shows the saved mean.",
    )
    lr_warmup_steps: int = _opt(0, "Warm-up steps of the schedule.")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    adam_weight_decay: float = _opt(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon.")
    max_grad_norm: Optional[float] = _opt(
        None,
        "Gradient clipping norm (0: no clipping). Default: the accelerate config's deepspeed_config.gradient_clipping "
        "if it sets one, else 1.0; when both are given they must agree.",
    )
    mixed_precision: Optional[str] = _opt(
        None, "'no', 'fp16' or 'bf16'; defaults to the accelerate config.", choices=("no", "fp16", "bf16")
    )
    gradient_checkpointing: bool = _opt(False, "Recompute UNet activations in the backward pass (less memory, slower).")
    allow_tf32: bool = _opt(False, "Allow TF32 matmuls on Ampere+ GPUs (faster).")
    dataloader_num_workers: Optional[int] = _opt(
        None,
        "Data loading worker processes (0: load on the training thread). Default: 0 when latents are cached "
        "(rows are tensors already), else min(4, CPUs / processes on this machine), at most one per stream shard.",
    )
    max_consecutive_nonfinite: int = _opt(5, "Stop when this many steps in a row have a non-finite loss.")
    logging_steps: int = _opt(
        10,
        "Every N optimizer steps the ranks agree on the logged loss, skipped steps and a requested stop (one small "
        "all-reduce; between them no step waits for the GPU). Checkpoint steps agree too.",
    )
    ddp_timeout: int = _opt(1800, "Seconds a collective may wait (process group timeout), e.g. while caching.")
    # --- checkpoints -------------------------------------------------------------------------
    checkpointing_steps: int = _opt(500, "Write a checkpoint-<step> folder every N optimizer steps.")
    checkpoints_total_limit: Optional[int] = _opt(None, "Keep at most this many checkpoints (oldest removed first).")
    resume_from_checkpoint: Optional[str] = _opt(None, "A checkpoint folder, or 'latest' (the newest in output_dir).")
    save_on_interrupt: bool = _opt(False, "On SIGTERM/SIGINT write a checkpoint before exiting (preemptible nodes).")
    export_fused_pipeline: Optional[str] = _opt(
        None, "Also write a full pipeline with the LoRA fused into the UNet to this folder."
    )
    export_dtype: str = _opt(
        "fp32",
        "Precision of the fused pipeline's stored weights (fused in fp32 first); fp16 halves the folder (load it "
        "with torch_dtype=torch.float16).",
        choices=DTYPE_NAMES,
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
    def __post_init__(self) -> None:
        # defaults that depend on the range, saved as decided
        ranged = self.guidance_scale_range is not None
        if self.guidance_loss_weighting is None:
            self.guidance_loss_weighting = INVERSE_SQUARE if ranged else GUIDANCE_OPTIONS_OFF["guidance_loss_weighting"]
        if self.lora_target_modules is None:
            self.lora_target_modules = [*DEFAULT_TARGET_MODULES, *(TIME_EMBEDDING_TARGET_MODULES if ranged else ())]
        if self.lr_scheduler is None:
            self.lr_scheduler = WARMUP_STABLE_DECAY if ranged else "constant"
        if self.lr_scheduler == WARMUP_STABLE_DECAY and self.lr_decay_fraction is None:
            self.lr_decay_fraction = DEFAULT_LR_DECAY_FRACTION
        if self.average_last_fraction is None:
            self.average_last_fraction = DEFAULT_AVERAGE_FRACTION if ranged else 0.0

    @property
    def guidance_scales(self) -> GuidanceScales:
        low, high = self.guidance_scale_range or (self.guidance_scale, self.guidance_scale)
        return GuidanceScales(float(low), float(high), self.guidance_scale_sampling)

    @property
    def conditioned_on_guidance(self) -> bool:
        """A student told w (one LoRA for every scale), rather than one fixed w."""
        return self.guidance_scale_range is not None

    @property
    def trajectory_states(self) -> bool:
        """States from guided trajectories (prompts only), not from noised images."""
        return self.train_states != "images"

    @property
    def prompts_for_validation(self) -> list[str]:
        return list(self.validation_prompts) or ([self.default_prompt] if self.default_prompt else [])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True, allow_nan=False)


def checkpointed_objects(train_states: Any, average_last_fraction: Any) -> int:
    """The student pool of an on-policy source, then the weight average: what a run with these
    settings registers for checkpointing (the recipe's setup), read off a checkpoint's saved config;
    accelerate writes one ``custom_checkpoint_<i>.pkl`` each and refuses a folder with another count."""
    return int(train_states == "student_trajectories") + int(bool(average_last_fraction))


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one ``--flag`` per :class:`TrainConfig` field."""
    return _build_parser(
        TrainConfig, "Distill classifier-free guidance of a Stable Diffusion UNet into a LoRA adapter."
    )


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse the CLI into a :class:`TrainConfig`; the run checks it (:func:`config_errors`) before any work."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def resolve_auto_cache(config: TrainConfig, num_rows: int | None) -> TrainConfig:
    """Turn the ``None`` (automatic) cache settings into decisions for a dataset of ``num_rows``
    rows (``None`` for a stream)."""
    small = num_rows is not None and num_rows <= AUTO_CACHE_MAX_ROWS
    latents = config.cache_latents if config.cache_latents is not None else small and not config.random_flip
    text = config.cache_text_embeddings if config.cache_text_embeddings is not None else small
    return dataclasses.replace(config, cache_latents=latents, cache_text_embeddings=text)
