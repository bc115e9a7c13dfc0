"""The optimizer of the trainable weights (AdamW) and its learning-rate schedule."""

from __future__ import annotations

from typing import Any

import torch

from .config import WARMUP_STABLE_DECAY, TrainConfig
from .distributed import is_deepspeed
from .schedule import Schedule, decay_steps


def setup_optimizer(
    config: TrainConfig, params: list[torch.nn.Parameter], schedule: Schedule, accelerator: Any
) -> tuple[Any, Any]:
    """AdamW over the trainable ``params`` and its schedule over the run's ``schedule.max_steps``."""
    num_processes = accelerator.num_processes
    optimizer = torch.optim.AdamW(
        params,
        lr=peak_lr(config, num_processes),
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        # fused: an update with non-finite gradients is skipped on the device (found_inf), no host
        # sync; DeepSpeed steps its own optimizer wrapper and skips them itself
        fused=not is_deepspeed(accelerator),
    )
    return optimizer, lr_schedule(config, optimizer, schedule.max_steps, num_processes)


def lr_schedule(config: TrainConfig, optimizer: torch.optim.Optimizer, max_steps: int, num_processes: int) -> Any:
    """The learning-rate schedule; the prepared scheduler steps once per process per optimizer step,
    hence the multiplications."""
    if config.lr_scheduler == WARMUP_STABLE_DECAY:
        from transformers.optimization import get_wsd_schedule

        assert config.lr_decay_fraction is not None  # TrainConfig decides it with the schedule
        return get_wsd_schedule(
            optimizer,
            num_warmup_steps=config.lr_warmup_steps * num_processes,
            num_decay_steps=decay_steps(max_steps, config.lr_decay_fraction) * num_processes,
            num_training_steps=max_steps * num_processes,
            decay_type="linear",
        )
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
    )


def peak_lr(config: TrainConfig, num_processes: int) -> float:
    if config.scale_lr:
        return config.learning_rate * config.train_batch_size * config.gradient_accumulation_steps * num_processes
    return config.learning_rate
