"""One micro-step of distillation: states from the source -> target -> student pass -> per-sample loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..guidance import GuidanceScales, distillation_loss, min_snr_weights
from .states import StateSource, TrainingStates
from .targets import Target, Teacher

# (student prediction, target, the states they are at) -> per-sample loss [B]
Loss = Callable[[torch.Tensor, torch.Tensor, TrainingStates], torch.Tensor]


def make_loss(
    kind: str,
    huber_c: float,
    snr_gamma: float | None,
    noise_scheduler: Any,
    balance_scales: GuidanceScales | None = None,
) -> Loss:
    """MSE or Huber between student and target, optionally min-SNR weighted per timestep and, over a
    range of guidance scales, balanced across scales (``balance_scales``: weights ``∝ 1 / w²``)."""

    def loss(pred: torch.Tensor, target: torch.Tensor, states: TrainingStates) -> torch.Tensor:
        per_sample = distillation_loss(pred, target, kind, huber_c)
        if snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(noise_scheduler, states.t, snr_gamma)
        if balance_scales is not None and isinstance(states.w, torch.Tensor):
            per_sample = per_sample * balance_scales.balanced_loss_weights(states.w).to(per_sample.device)
        return per_sample

    return loss


def step_generator(seed: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """Noise, timesteps and caption dropout of one micro-batch depend only on (seed, step, rank),
    so a resumed run draws exactly what an uninterrupted one would. The global RNG (LoRA dropout)
    is reseeded from the same value, since loading and iterator creation also draw from it."""
    value = ((seed * 1_000_003 + micro_step) * 4099 + rank) % (2**63)
    torch.manual_seed(value)
    return torch.Generator(device=device).manual_seed(value)


def distill_step(
    batch: dict[str, Any],
    student: Any,
    teacher: Teacher,
    source: StateSource,
    target: Target,
    loss: Loss,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample losses ``[B]`` and timesteps ``[B]`` of one micro-batch (student graph attached)."""
    states = source(batch, generator)
    goal = target.teacher_prediction(states, teacher)
    pred = student(
        states.x_t, states.t, encoder_hidden_states=states.cond, return_dict=False, **target.student_inputs(states)
    )[0]
    return loss(pred, goal, states), states.t
