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
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..conditioning import add_guidance_conditioning, guidance_projection
from ..lora import TIME_EMBEDDING_TARGET_MODULES, adapter_disabled, attach_lora, lora_parameters
from ..models import Components, encode_prompts, load_components, load_frozen_unet, place, weight_dtype_for
from .averaging import WeightAverage, averaging_start
from .checkpoint import read_step
from .checks import decay_fit_error, raise_if_any, told_guidance_error
from .collective import main_process_writes
from .config import INVERSE_SQUARE, SMOOTH_FEATURES, TrainConfig, resolve_auto_cache
from .data import TrainData
from .distributed import is_deepspeed, register_lora_only_state_hooks
from .inputs import cached_dataset, make_dataloader
from .integrity import load_state_or_error
from .launch import check_prepared
from .loader import EpochShuffleSampler, collate
from .loop import Stats, train_loop
from .on_policy import StudentStates
from .optimizer import peak_lr, setup_optimizer
from .outputs import save_final, write_summary
from .preflight import Preflight, preflight
from .resume import check_compatible, check_work_left, honour_learning_rate
from .rundir import RunDir
from .schedule import Schedule
from .states import NoisedImages, StateSource, StoredStates
from .step import Loss, make_loss
from .targets import GuidanceConditionedTarget, GuidedTarget, Target, Teacher
from .trajectory_inputs import (
    TrajectoryInputs,
    attach_student_walk,
    collate_states,
    prepare_trajectories,
    read_inputs,
)
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
    average: WeightAverage | None  # the mean of the last steps' weights, saved as the LoRA
    resume_from: Path | None
    run_dir: RunDir  # the output folder's lock; the run this one replaces, set aside until it is done

    @property
    def is_deepspeed(self) -> bool:
        return is_deepspeed(self.accelerator)


def run(config: TrainConfig) -> Stats:
    """Train the LoRA student; returns what was measured. Every rank calls this. Raises
    :class:`~.resume.RunComplete` when ``--resume_from_checkpoint latest`` finds the run finished."""
    training = setup(config)
    try:
        stats = train_loop(training)
        finish(training, stats)
    except BaseException:
        training.run_dir.failed()  # a run being replaced goes back in place
        raise
    return stats


# ------------------------------------------------------------------------------------------------
# setup
# ------------------------------------------------------------------------------------------------
def setup(config: TrainConfig) -> Training:
    """Check the inputs, read the data, load the models and build everything a run needs."""
    pre = preflight(config)
    try:
        return _build(config, pre)
    except BaseException:
        pre.run_dir.failed()
        raise


def _build(config: TrainConfig, pre: Preflight) -> Training:
    from accelerate.utils import set_seed

    config, accelerator, resume_from = pre.config, pre.accelerator, pre.resume_from
    seed = config.seed if config.seed is not None else 0
    set_seed(seed)
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    # data first: bad data should fail before minutes of model loading
    config, data, vae, latents, prompts = read_inputs(config, accelerator, weight_dtype)
    config, schedule = _plan(config, data, accelerator.num_processes, resume_from)

    components, trainable_params, separate_teacher = _setup_models(config, accelerator, weight_dtype, vae)
    uncond_emb = encode_prompts(components.tokenizer, components.text_encoder, [""])  # [1, 77, D], once
    trajectories = None
    if prompts is None:
        dataset = cached_dataset(config, data, components, accelerator, latents)
    else:  # the teacher's buffer, sampled with the raw UNet before DeepSpeed wraps it
        walk_dtype = torch.float32 if is_deepspeed(accelerator) else weight_dtype
        trajectories = prepare_trajectories(config, prompts, components, uncond_emb, accelerator, walk_dtype)
        dataset = trajectories.dataset
    sampler = None if config.streaming else EpochShuffleSampler(len(dataset), seed)
    dataloader = make_dataloader(
        config, dataset, sampler, seed, accelerator.device, collate if trajectories is None else collate_states
    )
    optimizer, lr_scheduler = setup_optimizer(config, trainable_params, schedule, accelerator)
    student, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        components.unet, optimizer, dataloader, lr_scheduler
    )
    check_prepared(accelerator, student, config)
    model = accelerator.unwrap_model(student)
    teacher = _teacher(student, model, separate_teacher)
    objective = build_objective(config, components, uncond_emb, weight_dtype, trajectories)
    if isinstance(objective["source"], StudentStates):  # before the restore: checkpoints hold its pool
        attach_student_walk(
            objective["source"], trajectories, components, student, teacher,
            objective["target"].student_inputs, uncond_emb, accelerator, weight_dtype,
        )  # fmt: skip
    average = None
    if config.average_last_fraction:  # registered after the student pool: checkpoints number them in order
        average = WeightAverage(model, averaging_start(schedule.max_steps, config.average_last_fraction))
        accelerator.register_for_checkpointing(average)
    start_step = _restore(accelerator, model, resume_from, lr_scheduler, peak_lr(config, accelerator.num_processes))
    if isinstance(objective["source"], StudentStates):
        objective["source"].after_update(start_step)  # the first pool (a resumed run has its own)
    # only now, with everything loaded, is anything in the output folder moved or written
    pre.run_dir.begin(config, resume_from, None if resume_from is None else start_step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.init_trackers(config.tracker_project_name, config=_tracker_config(config))
    return Training(
        config=config,
        accelerator=accelerator,
        components=components,
        student=student,
        model=model,
        teacher=teacher,
        separate_teacher=separate_teacher,
        trainable_params=trainable_params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        dataset=dataset,
        sampler=sampler,
        dataloader=dataloader,
        data=data,
        schedule=schedule,
        **objective,
        weight_dtype=weight_dtype,
        seed=seed,
        start_step=start_step,
        average=average,
        resume_from=resume_from,
        run_dir=pre.run_dir,
    )


def _plan(
    config: TrainConfig, data: TrainData, num_processes: int, resume_from: Path | None
) -> tuple[TrainConfig, Schedule]:
    """Decide the automatic settings from the data (never changed afterwards) and the schedule; a
    resume must have taken the same decisions and have steps left to train."""
    config = resolve_auto_cache(config, data.num_rows)
    if resume_from is not None:
        check_compatible(resume_from, config, names=("cache_latents", "cache_text_embeddings"))
    schedule = Schedule.plan(
        rows=data.num_rows,
        batch_size=config.train_batch_size,
        num_processes=num_processes,
        accumulation=config.gradient_accumulation_steps,
        max_train_steps=config.max_train_steps,
        num_train_epochs=config.num_train_epochs,
    )
    check_work_left(config, resume_from, schedule.max_steps)
    raise_if_any([e for e in [decay_fit_error(config, schedule.max_steps)] if e])  # a run sized by its epochs
    return config, schedule


def build_objective(
    config: TrainConfig,
    components: Components,
    uncond_emb: torch.Tensor,
    weight_dtype: torch.dtype,
    trajectories: TrajectoryInputs | None = None,
) -> dict[str, Any]:
    """The run's ``source`` of states, ``target`` and ``loss``: the one place the objective is chosen."""
    return {
        "source": _source(config, components, uncond_emb, weight_dtype, trajectories),
        "target": GuidanceConditionedTarget(
            uncond_emb, config.guidance_embedding_dim, config.guidance_embedding_features == SMOOTH_FEATURES
        )
        if config.conditioned_on_guidance
        else GuidedTarget(uncond_emb),
        "loss": make_loss(
            config.loss,
            config.huber_c,
            config.snr_gamma,
            components.noise_scheduler,
            config.guidance_scales if config.guidance_loss_weighting == INVERSE_SQUARE else None,
        ),
    }


def _source(
    config: TrainConfig,
    components: Components,
    uncond_emb: torch.Tensor,
    weight_dtype: torch.dtype,
    trajectories: TrajectoryInputs | None,
) -> StateSource:
    if trajectories is None:
        return NoisedImages(components, uncond_emb, config.guidance_scales, config.caption_dropout, weight_dtype)
    if config.train_states == "teacher_trajectories":
        return StoredStates(trajectories.prompt_embeddings, weight_dtype)
    return StudentStates(
        trajectories.prompt_embeddings,
        weight_dtype,
        fraction=config.student_state_fraction,
        refresh_steps=config.trajectory_refresh_steps,
        pool_trajectories=config.student_pool_trajectories,
        scales=config.guidance_scales,
        seed=config.seed if config.seed is not None else 0,
    )


def _setup_models(
    config: TrainConfig, accelerator: Any, weight_dtype: torch.dtype, vae: Any = None
) -> tuple[Components, list[torch.nn.Parameter], torch.nn.Module | None]:
    """The frozen components in place, the student's LoRA attached (fp32), the separate teacher if any."""
    components = load_components(config.pretrained_model_name_or_path, config.revision, config.variant, vae)
    raise_if_any(lora_target_errors(components.unet, config.lora_target_modules))  # before peft's own error
    told = components.unet.config.get("time_cond_proj_dim")  # a hub model's (a local one is refused in preflight)
    raise_if_any([told_guidance_error(config.pretrained_model_name_or_path, told)] if told is not None else [])
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
        if not any(n.startswith("time_embedding.") for n in lora_parameters(components.unet)):
            logger.warning(
                "--lora_target_modules leaves the time embedding without LoRA, so w reaches the student through "
                "cond_proj alone: the low scales of the range fit worse (BENCHMARKS.md); add %s to train it",
                " ".join(TIME_EMBEDDING_TARGET_MODULES),
            )
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


def _restore(accelerator: Any, model: Any, resume_from: Path | None, lr_scheduler: Any, peak_lr: float) -> int:
    """Register what checkpoints hold; load ``resume_from`` if given. Returns the step to start at."""
    register_lora_only_state_hooks(accelerator, model)
    if resume_from is None:
        return 0
    load_state_or_error(
        accelerator, resume_from, **({"load_module_strict": False} if is_deepspeed(accelerator) else {})
    )
    honour_learning_rate(lr_scheduler, peak_lr)
    step = read_step(resume_from)
    logger.info("resumed from %s at step %d", resume_from, step)
    return step


def _tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Trackers (tensorboard hparams) take scalars only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(config).items()}


# ------------------------------------------------------------------------------------------------
# finish
# ------------------------------------------------------------------------------------------------
def _final_validation(tr: Training, step: int) -> None:
    """The last step's images (unless the loop just rendered them) and, for an averaged run, those of
    the student that is saved: the mean, swapped in for them (a window of one step: its images are the
    last step's, not rendered twice)."""
    args = (tr.accelerator, tr.model, tr.separate_teacher, tr.components, tr.config, step, tr.weight_dtype)
    render = partial(run_validation, *args)
    if step % tr.config.validation_steps != 0:
        render()
    if tr.average is not None and tr.average.count > 1:  # the mean of one step is that step's weights
        with tr.average.in_model():
            render(name="mean")


def finish(tr: Training, stats: Stats) -> None:
    """The LoRA and final validation (unless interrupted), the summary; every rank calls it. Once the
    new LoRA is written, a run it replaces (``--overwrite_output_dir``) is deleted."""
    config = tr.config
    if stats.interrupted:
        logger.warning("interrupted at step %d; resume with --resume_from_checkpoint latest", stats.global_step)
    else:
        # the LoRA first: a render that fails (out of memory) must not cost the run its result
        save_final(tr.accelerator, tr.model, config, on_saved=tr.run_dir.discard_previous, average=tr.average)
        if config.prompts_for_validation:
            _final_validation(tr, stats.global_step)
    # every rank waits for it, so none tears its group down while the main one still writes
    main_process_writes(tr.accelerator, lambda: write_summary(config, stats))
    tr.accelerator.end_training()
    tr.run_dir.release()
