"""The distillation recipe in three phases: ``setup(config) -> Training``, ``train_loop(training) ->
Stats`` and ``finish(training, stats)``.

The student is the pipeline's UNet with a LoRA adapter; the teacher is the same UNet with the
adapter disabled (``--teacher shared``, one copy of the weights) or a second frozen UNet
(``--teacher separate``). Each micro-step a *state source* gives noisy states, a *target* gives
the teacher's guided prediction there, and the student learns it in one conditional pass.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..conditioning import add_guidance_conditioning, guidance_projection
from ..constants import CONFIG_FILE_NAME
from ..lora import adapter_disabled, attach_lora
from ..models import Components, encode_prompts, load_components, load_frozen_unet, place, weight_dtype_for
from .checkpoint import read_step, resolve_resume
from .checks import config_errors, raise_if_any
from .config import ConfigError, TrainConfig
from .data import TrainData
from .distributed import (
    accelerator_errors,
    is_deepspeed,
    make_accelerator,
    register_lora_only_state_hooks,
    setup_logging,
    warn_about_zero3,
)
from .inputs import cached_dataset, make_dataloader, read_data
from .launch import apply_to_deepspeed, check_prepared, resolve_launch
from .loader import EpochShuffleSampler
from .loop import Stats, train_loop
from .outputs import clear_previous_run, output_dir_errors, save_final, write_summary
from .schedule import Schedule
from .states import NoisedImages, StateSource
from .step import Loss, make_loss
from .targets import GuidanceConditionedTarget, GuidedTarget, Target, Teacher
from .validation import run_validation

logger = logging.getLogger(__name__)


@dataclass
class Training:
    """Everything a run holds once set up; :func:`train_loop` and :func:`finish` need nothing else."""

    config: TrainConfig  # resolved: every automatic setting decided
    accelerator: Any
    components: Components
    student: Any  # the prepared UNet (a DeepSpeed engine under DeepSpeed): call it to train
    model: Any  # the peft-carrying UNet inside it: adapter toggles, saving
    teacher: Teacher
    separate_teacher: torch.nn.Module | None
    trainable_params: list[torch.nn.Parameter]  # the LoRA (and a w-conditioned student's cond_proj)
    optimizer: Any
    lr_scheduler: Any
    dataset: Any
    sampler: EpochShuffleSampler | None
    dataloader: Any
    data: TrainData
    schedule: Schedule
    source: StateSource
    target: Target
    loss: Loss
    weight_dtype: torch.dtype
    seed: int
    start_step: int
    resume_from: Path | None

    @property
    def is_deepspeed(self) -> bool:
        return is_deepspeed(self.accelerator)


def run(config: TrainConfig) -> Stats:
    """Train the LoRA student; returns what was measured. Every rank calls this."""
    training = setup(config)
    stats = train_loop(training)
    finish(training, stats)
    return stats


# ------------------------------------------------------------------------------------------------
# setup
# ------------------------------------------------------------------------------------------------
def setup(config: TrainConfig) -> Training:
    """Check the inputs, read the data, load the models and build everything a run needs."""
    from accelerate.utils import set_seed

    config, accelerator, resume_from = _preflight(config)
    seed = config.seed if config.seed is not None else 0
    set_seed(seed)
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    # data first: bad data should fail before minutes of model loading
    config, data, vae, latents = read_data(config, accelerator, weight_dtype)
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        if config.overwrite_output_dir and resume_from is None:
            clear_previous_run(Path(config.output_dir))

    components, trainable_params, separate_teacher = _setup_models(config, accelerator, weight_dtype, vae)
    uncond_emb = encode_prompts(components.tokenizer, components.text_encoder, [""])  # [1, 77, D], once
    dataset = cached_dataset(config, data, components, accelerator, latents)
    sampler = None if config.streaming else EpochShuffleSampler(len(dataset), seed)
    dataloader = make_dataloader(config, dataset, sampler, seed, accelerator.device)
    schedule = Schedule.plan(
        rows=None if config.streaming else len(dataset),
        batch_size=config.train_batch_size,
        num_processes=accelerator.num_processes,
        accumulation=config.gradient_accumulation_steps,
        max_train_steps=config.max_train_steps,
        num_train_epochs=config.num_train_epochs,
    )
    optimizer, lr_scheduler = _setup_optimizer(config, trainable_params, schedule, accelerator)
    student, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        components.unet, optimizer, dataloader, lr_scheduler
    )
    check_prepared(accelerator, student, config)
    model = accelerator.unwrap_model(student)
    start_step = _restore(accelerator, model, resume_from)
    if accelerator.is_main_process:
        accelerator.init_trackers(config.tracker_project_name, config=_tracker_config(config))
        (Path(config.output_dir) / CONFIG_FILE_NAME).write_text(config.to_json())
    return Training(
        config=config,
        accelerator=accelerator,
        components=components,
        student=student,
        model=model,
        teacher=_teacher(student, model, separate_teacher),
        separate_teacher=separate_teacher,
        trainable_params=trainable_params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        dataset=dataset,
        sampler=sampler,
        dataloader=dataloader,
        data=data,
        schedule=schedule,
        **build_objective(config, components, uncond_emb, weight_dtype),
        weight_dtype=weight_dtype,
        seed=seed,
        start_step=start_step,
        resume_from=resume_from,
    )


def build_objective(
    config: TrainConfig, components: Components, uncond_emb: torch.Tensor, weight_dtype: torch.dtype
) -> dict[str, Any]:
    """The run's ``source`` of states, ``target`` and ``loss``: the one place the objective is chosen."""
    return {
        "source": NoisedImages(components, uncond_emb, config.guidance_scales, config.caption_dropout, weight_dtype),
        "target": GuidanceConditionedTarget(uncond_emb, config.guidance_embedding_dim)
        if config.conditioned_on_guidance
        else GuidedTarget(uncond_emb),
        "loss": make_loss(config.loss, config.huber_c, config.snr_gamma, components.noise_scheduler),
    }


def _preflight(config: TrainConfig) -> tuple[TrainConfig, Any, Path | None]:
    """Every input check that needs no model or data, reported together in one ConfigError; returns
    the config with the launch's settings resolved, the accelerator and the checkpoint to resume."""
    errors = config_errors(config)
    config, launch_errors = resolve_launch(config)
    errors += launch_errors
    try:
        accelerator = make_accelerator(config)
    except ValueError:
        raise_if_any(errors)  # a bad flag the accelerator tripped over: say what the user can fix
        raise
    setup_logging(accelerator)
    apply_to_deepspeed(accelerator, config)
    errors += accelerator_errors(accelerator, config)
    resume_from = None
    try:
        resume_from = resolve_resume(config)
    except ConfigError as err:
        errors.append(str(err))
    errors += output_dir_errors(config, resuming=resume_from is not None)
    raise_if_any(errors)
    warn_about_zero3(accelerator, config.teacher)
    return config, accelerator, resume_from


def _setup_models(
    config: TrainConfig, accelerator: Any, weight_dtype: torch.dtype, vae: Any = None
) -> tuple[Components, list[torch.nn.Parameter], torch.nn.Module | None]:
    """The frozen components in place, the student's LoRA attached (fp32), the separate teacher if any."""
    components = load_components(config.pretrained_model_name_or_path, config.revision, config.variant, vae)
    raise_if_any(lora_target_errors(components.unet, config.lora_target_modules))  # before peft's own error
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    place(components.vae, accelerator.device, weight_dtype)
    place(components.text_encoder, accelerator.device, weight_dtype)
    # DeepSpeed casts the engine's module itself; elsewhere the frozen base goes to half precision
    # and only the LoRA weights stay in float32 (the optimizer needs full-precision master weights).
    place(components.unet, accelerator.device, torch.float32 if is_deepspeed(accelerator) else weight_dtype)
    if config.conditioned_on_guidance:  # before the LoRA freezes the UNet and before DeepSpeed sees it
        add_guidance_conditioning(components.unet, config.guidance_embedding_dim)
    trainable_params = attach_lora(
        components.unet, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target_modules
    )
    projection = guidance_projection(components.unet)
    if projection is not None:  # trains with the LoRA (and is saved beside it)
        projection.requires_grad_(True)
        trainable_params.append(projection.weight)
    for p in trainable_params:
        p.data = p.data.float()
    if config.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
    separate_teacher = None
    if config.teacher == "separate":
        separate_teacher = load_frozen_unet(config.pretrained_model_name_or_path, config.revision, config.variant)
        place(separate_teacher, accelerator.device, weight_dtype)
    return components, trainable_params, separate_teacher


def lora_target_errors(unet: torch.nn.Module, targets: list[str]) -> list[str]:
    """Each ``--lora_target_modules`` name that matches no module, as peft matches them (the whole
    name or its last dotted parts), with names that do exist."""
    names = [name for name, _ in unet.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return []
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    suffixes: dict[str, None] = {}  # ordered set: the UNet's own order
    for name, module in unet.named_modules():
        if isinstance(module, layers):
            parts = name.split(".")
            suffixes[".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]] = None
    return [
        f"--lora_target_modules {' '.join(missing)}: no UNet module has that name; its layers are named "
        f"e.g. {', '.join(list(suffixes)[:10])}."
    ]


def _setup_optimizer(
    config: TrainConfig, params: list[torch.nn.Parameter], schedule: Schedule, accelerator: Any
) -> tuple[Any, Any]:
    from diffusers.optimization import get_scheduler

    num_processes = accelerator.num_processes
    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.train_batch_size * config.gradient_accumulation_steps * num_processes
    optimizer = torch.optim.AdamW(
        params,
        lr=lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        # fused: an update with non-finite gradients is skipped on the device (found_inf), no host
        # sync; DeepSpeed steps its own optimizer wrapper and skips them itself
        fused=not is_deepspeed(accelerator),
    )
    # the prepared scheduler steps once per process per optimizer step, hence the multiplication
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=schedule.max_steps * num_processes,
    )
    return optimizer, lr_scheduler


def _teacher(student: Any, model: Any, separate_teacher: torch.nn.Module | None) -> Teacher:
    """The module that plays the teacher: the separate UNet, or the adapter-disabled student called
    through the (possibly DeepSpeed-wrapped) engine."""

    @contextmanager
    def teacher() -> Iterator[Any]:
        if separate_teacher is not None:
            yield separate_teacher
            return
        with adapter_disabled(model):
            yield student

    return teacher


def _restore(accelerator: Any, model: Any, resume_from: Path | None) -> int:
    """Register what checkpoints hold; load ``resume_from`` if given. Returns the step to start at."""
    register_lora_only_state_hooks(accelerator, model)
    if resume_from is None:
        return 0
    accelerator.load_state(str(resume_from), **({"load_module_strict": False} if is_deepspeed(accelerator) else {}))
    step = read_step(resume_from)
    logger.info("resumed from %s at step %d", resume_from, step)
    return step


def _tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Trackers (tensorboard hparams) take scalars only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(config).items()}


# ------------------------------------------------------------------------------------------------
# finish
# ------------------------------------------------------------------------------------------------
def finish(tr: Training, stats: Stats) -> None:
    """Final validation and the LoRA (unless interrupted), the summary; every rank calls it."""
    config = tr.config
    if stats.interrupted:
        logger.warning("interrupted at step %d; resume with --resume_from_checkpoint latest", stats.global_step)
    else:
        if config.prompts_for_validation and stats.global_step % config.validation_steps != 0:
            run_validation(
                tr.accelerator, tr.model, tr.separate_teacher, tr.components, config, stats.global_step, tr.weight_dtype
            )
        save_final(tr.accelerator, tr.model, config)
    if tr.accelerator.is_main_process:
        write_summary(config, stats)
    tr.accelerator.end_training()
