"""The accelerator of a run: process group, DeepSpeed settings it can honour, what each rank logs,
and what ``save_state``/``load_state`` keep (the adapter, never the frozen base)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig

logger = logging.getLogger(__name__)
NOISY_LOGGERS = ("diffusers", "transformers", "datasets", "DeepSpeed", "torch.distributed")


def make_accelerator(config: TrainConfig) -> Any:
    """The accelerator for a config whose launch settings are resolved (:func:`.launch.resolve_launch`)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    # Without CUDA, distributed runs (several processes, or DeepSpeed) need the gloo backend.
    distributed = "WORLD_SIZE" in os.environ or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    backend = "gloo" if distributed and not torch.cuda.is_available() else None
    # One handler (accelerate refuses two). Caching a large set can keep ranks in a barrier for long;
    # accelerate drops a timeout equal to its default of 600 s, so 600 means torch's default here.
    handler = InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=config.ddp_timeout))
    report_to = None if config.report_to == "none" else config.report_to
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=str(Path(config.output_dir) / config.logging_dir)
        ),
        kwargs_handlers=[handler],
        # each process reads its own shard of a stream (captions are strings, not dispatchable tensors)
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False),
    )


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def accelerator_errors(accelerator: Any, config: TrainConfig) -> list[str]:
    """Settings of the launch this recipe cannot honour, found before any model loads (DeepSpeed
    itself would fail only at ``prepare``, deep inside a validation stack)."""
    errors = []
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        errors.append(
            "mixed precision fp16 was requested but there is no GPU; use --mixed_precision bf16 or no on a CPU."
        )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return errors
    stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3, "auto"):
        errors.append(
            f"the accelerate config asks for ZeRO stage {stage!r}; DeepSpeed has stages 0, 1, 2 and 3 "
            "(2 is a good default, 3 partitions the weights too)."
        )
    if plugin.deepspeed_config.get("fp16", {}).get("enabled") is True and not torch.cuda.is_available():
        errors.append('the DeepSpeed config enables fp16 but there is no GPU; set fp16 to false or "auto" on a CPU.')
    offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    stock_adam = (config.adam_beta1, config.adam_beta2, config.adam_epsilon) == (0.9, 0.999, 1e-8)
    if offload not in ("none", None) and not stock_adam:
        # accelerate swaps the optimizer for DeepSpeedCPUAdam and copies only lr and weight decay
        errors.append(
            "with the optimizer offloaded to the CPU, DeepSpeed's CPU Adam keeps only the learning rate and weight "
            "decay: --adam_beta1/--adam_beta2/--adam_epsilon would be ignored; use the defaults (0.9, 0.999, 1e-8) "
            "or a config without offload_optimizer."
        )
    return errors


def zero_stage(accelerator: Any) -> int | None:
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)


def warn_about_zero3(accelerator: Any, teacher: str) -> None:
    """ZeRO-3 shards the frozen base too, which pays only when the UNet does not fit one GPU."""
    if zero_stage(accelerator) != 3 or teacher != "shared" or not accelerator.is_main_process:
        return
    logger.warning(
        "ZeRO-3 partitions the frozen UNet as well: the teacher pass (adapter off) and the student pass call "
        "different modules, so DeepSpeed rebuilds its prefetch trace every step and gathers the whole UNet about "
        "3 times per micro-batch, to shard an optimizer state of a few MB. ZeRO-2 is faster for LoRA training "
        "whenever the base fits one GPU (SD-2.1's UNet is 1.7 GB in fp16); see README, 'Choosing a ZeRO stage'."
    )


def register_lora_only_state_hooks(accelerator: Any, model: Any) -> None:
    """Keep the frozen base out of ``save_state`` and restore the adapter on ``load_state``.

    Under DeepSpeed the engine saves (``exclude_frozen_parameters``) and loads the adapter and
    its fp32 master weights itself, so the hooks only act for plain accelerate.
    """
    if is_deepspeed(accelerator):
        return
    from ..conditioning import load_guidance_projection
    from ..lora import load_lora_into_unet

    def save_hook(models: list[Any], weights: list[Any], output_dir: str) -> None:
        weights.clear()  # the adapter is written separately as pytorch_lora_weights.safetensors

    def load_hook(models: list[Any], input_dir: str) -> None:
        models.clear()
        load_lora_into_unet(model, input_dir)
        load_guidance_projection(model, input_dir)  # a w-conditioned student's cond_proj

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def setup_logging(accelerator: Any) -> None:
    level = logging.INFO if accelerator.is_local_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
