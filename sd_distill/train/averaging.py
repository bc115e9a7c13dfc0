"""Tail averaging: the saved LoRA is the uniform mean of the trained weights over a run's last steps.

A range student's batches mix scales from the whole range, so its updates stay noisy and its weights
wander about the optimum more than a fixed-w student's; the mean of its last steps lies nearer the
optimum than any one of them (Polyak averaging; on the toy teacher the error at w = 2 fell by 18 % on
top of the learning-rate decay, 0.0011 -> 0.0009 over 3 seeds). The mean is kept in fp32 beside each weight, on its
device, updated after every optimizer step of the window (no host sync), checkpointed with the run
(``accelerator.register_for_checkpointing``) and written instead of the last step's weights.

Under DeepSpeed ZeRO-1/2 the weights averaged are the engine's module copy (bf16/fp16 under mixed
precision: the mean of rounded weights, in fp32); ZeRO-3 partitions them, so it is refused there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from ..conditioning import StudentWeights, guidance_projection
from ..constants import GUIDANCE_PROJ_KEY
from ..lora import lora_parameters
from .config import TrainConfig

logger = logging.getLogger(__name__)


def averaging_errors(config: TrainConfig, zero_stage: Any) -> list[str]:
    """ZeRO-3 partitions the weights, so no rank holds them whole to average: refused there."""
    if config.average_last_fraction and zero_stage == 3:
        why = " (on by default for a --guidance_scale_range student)" if config.conditioned_on_guidance else ""
        return [
            f"--average_last_fraction {config.average_last_fraction}{why}: weight averaging does not work under "
            "DeepSpeed ZeRO-3, which partitions the weights; pass --average_last_fraction 0 (the LoRA is then "
            "the last step's) or use ZeRO-2."
        ]
    return []


def averaging_start(max_steps: int, fraction: float) -> int:
    """The last step *not* averaged: the mean is over steps ``start + 1 … max_steps`` (at least one).
    Kept as checkpoints since averaging began have it (a new rounding would make a resumed run drop its
    mean as if --max_train_steps had changed); the model card says how many steps it was."""
    return max(0, min(max_steps - 1, round(max_steps * (1 - fraction))))


class WeightAverage:
    """The running mean of the student's trainable weights after each step past ``start_step``."""

    def __init__(self, model: torch.nn.Module, start_step: int) -> None:
        self.named = dict(lora_parameters(model))
        proj = guidance_projection(model)
        if proj is not None:
            self.named[GUIDANCE_PROJ_KEY] = proj.weight
        self.start_step = start_step
        self.count = 0
        self.last_step = 0  # the last step seen, in the window or not
        self.mean = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in self.named.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step ``step``: fold the weights into the mean if the window has begun."""
        self.last_step = step
        if step <= self.start_step:
            return
        self.count += 1
        for name, p in self.named.items():
            self.mean[name].lerp_(p.detach().float(), 1.0 / self.count)

    @contextlib.contextmanager
    def in_model(self) -> Iterator[None]:
        """The model holds the mean inside (the saved student, for its validation images) and its own
        weights again afterwards."""
        own = {n: p.detach().clone() for n, p in self.named.items()}
        _copy_into(self.named, self.mean)
        try:
            yield
        finally:
            _copy_into(self.named, own)

    def student_weights(self, model: torch.nn.Module) -> StudentWeights:
        """The mean as the student's weights, in the form :func:`~sd_distill.conditioning.save_student` writes."""
        from peft.utils import get_peft_model_state_dict

        values = {n: m.detach().to("cpu", copy=True).contiguous() for n, m in self.mean.items()}
        proj = values.pop(GUIDANCE_PROJ_KEY, None)
        return StudentWeights(get_peft_model_state_dict(model, state_dict=values), proj)

    def state_dict(self) -> dict[str, Any]:
        mean = {n: m.cpu() for n, m in self.mean.items()}
        return {"start_step": self.start_step, "count": self.count, "last_step": self.last_step, "mean": mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # checkpoints before "last_step": inside the window it is where the mean reached, else unknown
        resumed = int(state.get("last_step", state["start_step"] + state["count"] if state["count"] else 0))
        if state["start_step"] != self.start_step:  # --max_train_steps changed on resume: a new window
            if state["count"] or resumed > self.start_step:  # else the new window is still whole ahead
                logger.warning(
                    "weight averaging: --max_train_steps changed, so this run's window (the steps after step %d) "
                    "is not the checkpoint's (after step %d); the checkpoint's mean of %d step(s) is dropped and "
                    "the mean is taken over the steps after step %d",
                    self.start_step,
                    state["start_step"],
                    state["count"],
                    max(self.start_step, resumed),
                )
            self.last_step = resumed
            return
        self.count = int(state["count"])
        self.last_step = resumed
        for name, mean in self.mean.items():
            mean.copy_(state["mean"][name])


@torch.no_grad()
def _copy_into(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for name, p in params.items():
        p.copy_(values[name])
