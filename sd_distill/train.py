"""The distillation recipe: setup -> train -> save, read top to bottom.

The student is the pipeline's UNet with a LoRA adapter; the teacher is the same UNet with the
adapter disabled (``--teacher shared``, one copy of the weights) or a second frozen UNet
(``--teacher separate``). Each step the teacher predicts ``u + w (c - u)`` with one batched
forward pass and the student learns to predict it with one conditional pass.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import read_step, resolve_resume, save_checkpoint
from .config import CONFIG_FILE_NAME, ConfigError, TrainConfig, resolve_auto_cache
from .data import TrainData, build_train_data, collate
from .guidance import distillation_loss, min_snr_weights, sample_timesteps, teacher_cfg_prediction
from .lora import LORA_WEIGHTS_NAME, adapter_disabled, attach_lora, lora_state_dict, save_lora
from .models import Components, encode_images, encode_prompts, load_components, load_frozen_unet, weight_dtype_for
from .validation import run_validation

logger = logging.getLogger(__name__)
NUM_LOSS_BUCKETS = 4  # loss is also logged per quarter of the timestep range


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss keeps being non-finite); the message says why."""


# ------------------------------------------------------------------------------------------------
# Setup
# ------------------------------------------------------------------------------------------------
def make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    # Without CUDA, distributed runs (several processes, or DeepSpeed) need the gloo backend.
    distributed = "WORLD_SIZE" in os.environ or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    handlers = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    report_to = None if config.report_to == "none" else config.report_to
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / config.logging_dir)
        ),
        kwargs_handlers=handlers,
        # each process reads its own shard of a stream (captions are strings, not dispatchable tensors)
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
    )


def check_output_dir(config: TrainConfig, resuming: bool) -> None:
    """Refuse to write over a finished run or mix checkpoints of two runs (nothing is lost)."""
    out = Path(config.output_dir)
    if config.overwrite_output_dir or resuming or not out.exists():
        return
    if (out / LORA_WEIGHTS_NAME).exists():
        raise ConfigError(f"--output_dir {str(out)!r} already holds a finished run; pass --overwrite_output_dir to replace it or choose another folder.")
    if any(out.glob("checkpoint-*")):
        raise ConfigError(f"--output_dir {str(out)!r} has checkpoints of an earlier run; pass --resume_from_checkpoint latest to continue it or --overwrite_output_dir to start over.")


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation drawn from ``(seed, epoch)``: the same order when a run is resumed."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def select_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())


def step_generator(seed: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """Noise, timesteps and caption dropout of one micro-batch depend only on (seed, step, rank),
    so a resumed run draws exactly what an uninterrupted one would. The global RNG (LoRA dropout)
    is reseeded from the same value, since loading and iterator creation also draw from it."""
    value = ((seed * 1_000_003 + micro_step) * 4099 + rank) % (2**63)
    torch.manual_seed(value)
    return torch.Generator(device=device).manual_seed(value)


@dataclass
class Stats:
    """What a run measured; returned by :func:`run` and written to ``train_summary.json``."""

    global_step: int = 0
    final_loss: float = float("nan")
    skipped_nonfinite: int = 0
    skipped_rows: int = 0  # rows whose image could not be decoded
    empty_captions: int = 0  # rows trained on the empty prompt because their caption was unusable
    steps_per_second: float = 0.0
    seconds: float = 0.0
    interrupted: bool = False
    losses: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# The distillation step
# ------------------------------------------------------------------------------------------------
def distill_step(
    batch: dict[str, Any],
    student: Any,
    teacher: Any,
    components: Components,
    uncond_emb: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    weight_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses ``[B]`` and timesteps ``[B]`` of one micro-batch (student graph attached).

    ``teacher`` is a callable context: entering it yields the module that plays the teacher.
    """
    c = components
    device = uncond_emb.device
    if "latents" in batch:
        latents = batch["latents"].to(device, torch.float32)
    else:
        latents = encode_images(c.vae, batch["pixel_values"], generator).float()  # [B, 4, h, w]
    if "text_embeddings" in batch:
        cond = batch["text_embeddings"].to(device)
    else:
        cond = encode_prompts(c.tokenizer, c.text_encoder, batch["caption"])  # [B, 77, D]
    bsz = latents.shape[0]
    if config.caption_dropout > 0:
        drop = torch.rand(bsz, generator=generator, device=generator.device).to(device) < config.caption_dropout
        cond = torch.where(drop[:, None, None], uncond_emb.expand_as(cond).to(cond.dtype), cond)
    cond = cond.to(weight_dtype)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
    t = sample_timesteps(bsz, c.noise_scheduler.config.num_train_timesteps, generator, device)
    x_t = c.noise_scheduler.add_noise(latents, noise, t).to(weight_dtype)  # [B, 4, h, w]

    with teacher() as teacher_unet:
        target = teacher_cfg_prediction(teacher_unet, x_t, t, cond, uncond_emb.to(weight_dtype), config.guidance_scale)
    pred = student(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]
    per_sample = distillation_loss(pred, target, config.loss, config.huber_c)
    if config.snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(c.noise_scheduler, t, config.snr_gamma)
    return per_sample, t


# ------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------
def run(config: TrainConfig) -> Stats:
    """Train the LoRA student; returns what was measured. Every rank calls this."""
    from accelerate.utils import DistributedType, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    accelerator = make_accelerator(config)
    _setup_logging(accelerator)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("mixed precision fp16 was requested but there is no GPU; use --mixed_precision bf16 or no on a CPU.")
    _check_deepspeed(accelerator)
    resume_from = resolve_resume(config)
    check_output_dir(config, resuming=resume_from is not None)
    seed = config.seed if config.seed is not None else 0
    set_seed(seed)
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    # -- data first: bad data should fail before minutes of model loading -----------------------
    data: TrainData = build_train_data(config, show_progress=accelerator.is_local_main_process)
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        if config.overwrite_output_dir and resume_from is None:
            _clear_previous_run(Path(config.output_dir))

    # -- models ----------------------------------------------------------------------------------
    weight_dtype = weight_dtype_for(accelerator.mixed_precision)
    components = load_components(config.pretrained_model_name_or_path, config.revision, config.variant)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    _place(components.vae, accelerator.device, weight_dtype)
    _place(components.text_encoder, accelerator.device, weight_dtype)
    unet = components.unet
    # DeepSpeed casts the engine's module itself; elsewhere the frozen base goes to half precision
    # and only the LoRA weights stay in float32 (the optimizer needs full-precision master weights).
    _place(unet, accelerator.device, torch.float32 if is_deepspeed else weight_dtype)
    lora_params = attach_lora(unet, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    for p in lora_params:
        p.data = p.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    separate_teacher = None
    if config.teacher == "separate":
        separate_teacher = load_frozen_unet(config.pretrained_model_name_or_path, config.revision, config.variant)
        _place(separate_teacher, accelerator.device, weight_dtype)
    uncond_emb = encode_prompts(components.tokenizer, components.text_encoder, [""])  # [1, 77, D], once

    dataset = data.dataset
    config = resolve_auto_cache(config, data.num_rows)
    if config.cache_latents or config.cache_text_embeddings:
        from .cache import build_cached_dataset

        logger.info("caching %s", " and ".join(n for n, on in (("latents", config.cache_latents), ("text embeddings", config.cache_text_embeddings)) if on))
        dataset = build_cached_dataset(config, dataset, components, accelerator)  # type: ignore[arg-type]
        if config.cache_latents and config.cache_text_embeddings:
            _release_encoders(components, keep=bool(config.prompts_for_validation))
    sampler = None if config.streaming else EpochShuffleSampler(len(dataset), seed)  # type: ignore[arg-type]
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=config.train_batch_size, sampler=sampler, collate_fn=collate,
        num_workers=config.dataloader_num_workers, drop_last=False,
        generator=torch.Generator().manual_seed(seed),  # keeps iterator creation off the global RNG
    )

    # -- optimisation ----------------------------------------------------------------------------
    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        lora_params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay, eps=config.adam_epsilon,
    )
    batches_per_epoch = None if config.streaming else math.ceil(len(dataset) / (config.train_batch_size * accelerator.num_processes))  # type: ignore[arg-type]
    updates_per_epoch = None if batches_per_epoch is None else math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * (updates_per_epoch or 1)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    model = accelerator.unwrap_model(unet)  # the peft-carrying UNet (adapter toggles, saving)

    @contextmanager
    def teacher() -> Iterator[Any]:
        """The module that plays the teacher: the separate UNet, or the adapter-disabled student
        called through the (possibly DeepSpeed-wrapped) engine."""
        if separate_teacher is not None:
            yield separate_teacher
            return
        with adapter_disabled(model):
            yield unet

    _register_lora_only_state_hooks(accelerator, model, is_deepspeed)
    global_step = 0
    if resume_from is not None:
        load_kwargs = {"load_module_strict": False} if is_deepspeed else {}
        accelerator.load_state(str(resume_from), **load_kwargs)
        global_step = read_step(resume_from)
        logger.info("resumed from %s at step %d", resume_from, global_step)
    if accelerator.is_main_process:
        accelerator.init_trackers(config.tracker_project_name, config=_tracker_config(config))
        (Path(config.output_dir) / CONFIG_FILE_NAME).write_text(config.to_json())

    # -- train -----------------------------------------------------------------------------------
    stop = _InterruptFlag(config.save_on_interrupt)
    stats = Stats(global_step=global_step)
    if data.scan is not None:
        stats.skipped_rows, stats.empty_captions = data.scan.bad_images, data.scan.bad_captions
    progress = tqdm(total=max_steps, initial=global_step, desc="distilling", disable=not accelerator.is_local_main_process)
    first_epoch = global_step // updates_per_epoch if updates_per_epoch else 0
    if updates_per_epoch:
        skip_batches = (global_step - first_epoch * updates_per_epoch) * config.gradient_accumulation_steps
    else:  # a stream has no epochs: skip what was already consumed
        skip_batches = global_step * config.gradient_accumulation_steps
    consecutive_nonfinite = 0
    bucket_sum = torch.zeros(NUM_LOSS_BUCKETS)
    bucket_n = torch.zeros(NUM_LOSS_BUCKETS)
    window_losses: list[float] = []
    start_step, start_time, last_log_time = global_step, time.perf_counter(), time.perf_counter()
    unet.train()
    epoch = first_epoch
    while global_step < max_steps and not stop.requested:
        # Not named set_epoch: accelerate's loader calls set_epoch(times iterated), which
        # differs from the epoch after a resume (the resumed epoch runs in a skipping loader).
        for holder in (sampler, dataset):
            if hasattr(holder, "select_epoch"):
                holder.select_epoch(epoch)  # type: ignore[union-attr]
        epoch_loader = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
        # micro-batch counter that an uninterrupted run would have reached (seeds the step's noise)
        micro_step = epoch * batches_per_epoch + skip_batches if batches_per_epoch else global_step * config.gradient_accumulation_steps
        skip_batches = 0
        for batch in epoch_loader:
            micro_step += 1
            stats.skipped_rows += int(batch.get("bad_rows", 0))
            with accelerator.accumulate(unet):
                gen = step_generator(seed, micro_step, accelerator.process_index, accelerator.device)
                per_sample, t = distill_step(batch, unet, teacher, components, uncond_emb, config, gen, weight_dtype)
                loss = per_sample.mean()
                # one collective per micro-batch: every rank takes the same skip/stop decision,
                # and the logged loss is the mean over ranks
                flags = torch.tensor([float(not torch.isfinite(loss)), float(stop.requested), loss.detach().float().item()], device=accelerator.device)
                flags = accelerator.reduce(flags, reduction="sum")
                if flags[0] > 0:
                    stats.skipped_nonfinite += 1
                    consecutive_nonfinite += 1
                    logger.warning("non-finite loss at step %d; skipping this batch (no update)", global_step)
                    if consecutive_nonfinite >= config.max_consecutive_nonfinite:
                        raise TrainingError(
                            f"the loss was non-finite (NaN/inf) for {consecutive_nonfinite} steps in a row. With fp16 this is "
                            "usually overflow: try --mixed_precision bf16 (or no), a lower --learning_rate, or --max_grad_norm 1.0."
                        )
                    optimizer.zero_grad(set_to_none=True)
                else:
                    consecutive_nonfinite = 0
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and not is_deepspeed:
                        accelerator.clip_grad_norm_(lora_params, config.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    _accumulate_buckets(per_sample.detach().float().cpu(), t.cpu(), components, bucket_sum, bucket_n)
                    window_losses.append(flags[2].item() / accelerator.num_processes)
                if flags[1] > 0:
                    stop.requested = True
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            if window_losses:
                stats.final_loss = sum(window_losses) / len(window_losses)
                stats.losses.append(stats.final_loss)
            now = time.perf_counter()
            logs = {"loss": stats.final_loss, "lr": lr_scheduler.get_last_lr()[0], "step_time": now - last_log_time}
            logs.update({f"loss_t{i}": (bucket_sum[i] / bucket_n[i]).item() for i in range(NUM_LOSS_BUCKETS) if bucket_n[i] > 0})
            last_log_time = now
            bucket_sum.zero_(), bucket_n.zero_(), window_losses.clear()
            accelerator.log(logs, step=global_step)
            progress.set_postfix(loss=f"{stats.final_loss:.4g}")
            if global_step % config.checkpointing_steps == 0 or stop.requested:
                save_checkpoint(accelerator, model, config, global_step, protect=resume_from)
            if config.prompts_for_validation and global_step % config.validation_steps == 0:
                run_validation(accelerator, model, separate_teacher, components, config, global_step, weight_dtype)
            if global_step >= max_steps or stop.requested:
                break
        epoch += 1
    progress.close()
    stats.global_step = global_step
    stats.seconds = time.perf_counter() - start_time
    stats.steps_per_second = (global_step - start_step) / stats.seconds if stats.seconds > 0 else 0.0
    stats.interrupted = stop.requested
    stop.restore()

    # -- save ------------------------------------------------------------------------------------
    if stop.requested:
        logger.warning("interrupted at step %d; resume with --resume_from_checkpoint latest", global_step)
    else:
        if config.prompts_for_validation and global_step % config.validation_steps != 0:
            run_validation(accelerator, model, separate_teacher, components, config, global_step, weight_dtype)
        save_final(accelerator, model, config)
    if accelerator.is_main_process:
        (Path(config.output_dir) / "train_summary.json").write_text(json.dumps(asdict(stats), indent=2))
    accelerator.end_training()
    return stats


def _check_deepspeed(accelerator: Any) -> None:
    """Refuse DeepSpeed settings this recipe cannot honour before any model is loaded
    (DeepSpeed itself would fail only at ``prepare``, deep inside a validation stack)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3, "auto"):
        raise ConfigError(f"the accelerate config asks for ZeRO stage {stage!r}; DeepSpeed has stages 0, 1, 2 and 3 (2 is a good default, 3 partitions the weights too).")
    if plugin.deepspeed_config.get("fp16", {}).get("enabled") is True and not torch.cuda.is_available():
        raise ConfigError("the DeepSpeed config enables fp16 but there is no GPU; set fp16 to false or \"auto\" on a CPU.")


def _release_encoders(components: Components, keep: bool) -> None:
    """With everything cached the loop never runs the VAE or text encoder: free them (peak RAM
    0.73x on SD-2.1, BENCHMARKS.md row 4), or, when validation still needs them, park them in
    CPU memory while training on a GPU (validation brings them back)."""
    import gc

    if not keep:
        components.vae = components.text_encoder = None  # type: ignore[assignment]
        gc.collect()
    elif torch.cuda.is_available():
        components.vae.to("cpu"), components.text_encoder.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``module``; cast only when its dtype differs (diffusers warns on needless casts)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


def _accumulate_buckets(per_sample: torch.Tensor, t: torch.Tensor, components: Components, sums: torch.Tensor, counts: torch.Tensor) -> None:
    buckets = (t * NUM_LOSS_BUCKETS // components.noise_scheduler.config.num_train_timesteps).clamp(max=NUM_LOSS_BUCKETS - 1)
    sums.index_add_(0, buckets, per_sample)
    counts.index_add_(0, buckets, torch.ones_like(per_sample))


def _register_lora_only_state_hooks(accelerator: Any, model: Any, is_deepspeed: bool) -> None:
    """Keep the frozen base out of ``save_state`` and restore the adapter on ``load_state``.

    Under DeepSpeed the engine saves (``exclude_frozen_parameters``) and loads the adapter and
    its fp32 master weights itself, so the hooks only act for plain accelerate.
    """
    if is_deepspeed:
        return
    from .lora import load_lora_into_unet

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        weights.clear()  # the adapter is written separately as pytorch_lora_weights.safetensors

    def load_hook(models: list[Any], input_dir: str) -> None:
        models.clear()
        load_lora_into_unet(model, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_final(accelerator: Any, model: Any, config: TrainConfig) -> None:
    """The adapter in diffusers LoRA format, the config and a model card; optionally a fused pipeline."""
    lora = lora_state_dict(model)  # collective under ZeRO-3
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    out = Path(config.output_dir)
    save_lora(lora, out)
    (out / CONFIG_FILE_NAME).write_text(config.to_json())
    (out / "README.md").write_text(_model_card(config))
    logger.info("saved the LoRA adapter to %s", out / LORA_WEIGHTS_NAME)
    if config.export_fused_pipeline:
        export_fused_pipeline(config.pretrained_model_name_or_path, out, config.export_fused_pipeline, config.revision, config.variant)
    accelerator.wait_for_everyone()


def export_fused_pipeline(base: str, lora_dir: Path, target: str, revision: str | None = None, variant: str | None = None) -> Path:
    """Write a full pipeline with the LoRA fused into the UNet (one folder, no peft needed)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, revision=revision, variant=variant, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(target, safe_serialization=True)
    shutil.copy(lora_dir / CONFIG_FILE_NAME, Path(target) / CONFIG_FILE_NAME)
    logger.info("exported the fused pipeline to %s", target)
    return Path(target)


def _model_card(config: TrainConfig) -> str:
    return f"""---
base_model: {config.pretrained_model_name_or_path}
library_name: diffusers
tags: [stable-diffusion, lora, guidance-distillation, sd-distill]
---
# Guidance-distilled LoRA for `{config.pretrained_model_name_or_path}`

This LoRA (rank {config.lora_rank}) was trained with sd-distill to make the UNet predict, in one
conditional pass, what the base model predicts with classifier-free guidance at scale
**{config.guidance_scale}**. Sample it with `guidance_scale=1` (one UNet pass per step, about twice
as fast as the base with guidance):

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{config.pretrained_model_name_or_path}")
pipe.load_lora_weights("{config.output_dir}")
image = pipe("a photo of a cat", guidance_scale=1.0).images[0]
```

Training settings are in `{CONFIG_FILE_NAME}`.
"""


class _InterruptFlag:
    """With ``--save_on_interrupt``, SIGTERM/SIGINT ask the loop to checkpoint and stop."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread (e.g. called from a notebook worker)
                    pass

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _clear_previous_run(out: Path) -> None:
    for path in list(out.glob("checkpoint-*")) + list(out.glob(".checkpoint-*")):
        shutil.rmtree(path, ignore_errors=True)
    for name in (LORA_WEIGHTS_NAME, "train_summary.json"):
        (out / name).unlink(missing_ok=True)


def _tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Trackers (tensorboard hparams) take scalars only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(config).items()}


def _setup_logging(accelerator: Any) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    for noisy in ("diffusers", "transformers", "datasets", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
