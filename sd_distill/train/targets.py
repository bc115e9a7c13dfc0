"""What the student learns to predict at a state: the other seam of the recipe.

A *target* gives the teacher's prediction for :class:`~sd_distill.train.states.TrainingStates`
(running the teacher, unless the states carry it already) and whatever extra inputs the student
takes (a guidance-conditioned student is told ``w``). A new objective is a new class with these two
methods; the loop does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from ..conditioning import student_timestep_cond
from ..guidance import teacher_cfg_prediction
from .states import TrainingStates

# Entering it yields the module that plays the teacher (the adapter-disabled student, or a second UNet).
Teacher = Callable[[], AbstractContextManager[Any]]


class Target(Protocol):
    def teacher_prediction(self, states: TrainingStates, teacher: Teacher) -> torch.Tensor: ...

    def student_inputs(self, states: TrainingStates) -> dict[str, Any]: ...


class GuidedTarget:
    """Classifier-free guidance ``u + w (c - u)`` of the teacher, from one batched ``[∅; c]`` pass."""

    def __init__(self, uncond_emb: torch.Tensor) -> None:
        self.uncond_emb = uncond_emb  # [1, L, D], the empty prompt encoded once

    def teacher_prediction(self, states: TrainingStates, teacher: Teacher) -> torch.Tensor:
        if states.target is not None:
            return states.target
        with teacher() as unet:
            return teacher_cfg_prediction(
                unet, states.x_t, states.t, states.cond, self.uncond_emb.to(states.x_t.dtype), states.w
            )

    def student_inputs(self, states: TrainingStates) -> dict[str, Any]:
        return {}  # the fixed-w student is told nothing: it is the conditional UNet plus the LoRA


class GuidanceConditionedTarget(GuidedTarget):
    """The same guided target at a ``w`` per sample, and the student is told ``w``: the embedding of
    ``w - 1`` as ``timestep_cond``, what stock ``StableDiffusionPipeline`` passes for ``guidance_scale=w``
    once the UNet has ``time_cond_proj_dim``. The teacher pass gets no ``timestep_cond``."""

    def __init__(self, uncond_emb: torch.Tensor, embedding_dim: int, smooth_only: bool = False) -> None:
        super().__init__(uncond_emb)
        self.embedding_dim, self.smooth_only = embedding_dim, smooth_only

    def student_inputs(self, states: TrainingStates) -> dict[str, Any]:
        cond = student_timestep_cond(states.w, self.embedding_dim, states.x_t, self.smooth_only)
        return {"timestep_cond": cond}
