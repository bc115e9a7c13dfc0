"""The classifier-free-guidance target and the batched teacher pass: pure math, no training state.

Shapes: ``x_t`` latents ``[B, C, h, w]``, ``t`` timesteps ``[B]``, text embeddings ``[B, L, D]``,
guidance scale ``w`` a float or ``[B]`` (per-sample, so a student conditioned on ``w`` needs no
new math).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


def cfg_target(uncond: torch.Tensor, cond: torch.Tensor, w: float | torch.Tensor) -> torch.Tensor:
    """``u + w (c - u)``; linear in the prediction, so it holds for epsilon and v prediction alike."""
    w = torch.as_tensor(w, dtype=cond.dtype, device=cond.device)
    if w.ndim == 1:  # [B] -> [B, 1, 1, 1] to broadcast over the latent dims
        w = w.view(-1, *([1] * (cond.ndim - 1)))
    return uncond + w * (cond - uncond)


@torch.no_grad()
def teacher_cfg_prediction(
    unet: Any,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond_emb: torch.Tensor,
    uncond_emb: torch.Tensor,
    w: float | torch.Tensor,
    **unet_kwargs: Any,
) -> torch.Tensor:
    """The teacher's guided prediction with ONE forward of batch ``2B``: ``[∅; c]``.

    ``uncond_emb`` may be ``[1, L, D]`` (the empty prompt, computed once) and is expanded to ``B``.
    """
    batch = x_t.shape[0]
    uncond_emb = uncond_emb.expand(batch, -1, -1)
    out = unet(
        torch.cat([x_t, x_t]),  # [2B, C, h, w]
        torch.cat([t, t]),
        encoder_hidden_states=torch.cat([uncond_emb, cond_emb]).to(x_t.dtype),  # [2B, L, D]
        return_dict=False,
        **unet_kwargs,
    )[0]
    uncond, cond = out.float().chunk(2)  # each [B, C, h, w]
    return cfg_target(uncond, cond, w)


@dataclass(frozen=True)
class GuidanceScales:
    """The guidance scale(s) a run distils: one ``w`` (``low == high``), or ``w`` drawn per sample from
    ``[low, high]``, uniformly or uniformly in ``log w``."""

    low: float
    high: float
    sampling: str = "uniform"  # "uniform" | "log"

    @property
    def fixed(self) -> bool:
        return self.low == self.high

    def draw(self, batch: int, generator: torch.Generator, device: torch.device | str) -> float | torch.Tensor:
        """``w`` for a batch: the float itself when fixed (drawing nothing, so a fixed-w run's random
        stream is unchanged), else ``[B]`` float32."""
        if self.fixed:
            return self.low
        u = torch.rand(batch, generator=generator, device=generator.device)
        if self.sampling == "log":
            w = torch.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            w = self.low + u * (self.high - self.low)
        return w.to(device)

    def balanced_loss_weights(self, w: torch.Tensor) -> torch.Tensor:
        """``[B]`` weights ``∝ 1 / w²`` with mean 1 over the range's own distribution of ``w``.

        The guided target's distance from the conditional prediction grows as ``(w - 1)``, so a plain
        MSE over a range is ruled by the highest scales and leaves the lowest ones barely fitted;
        ``1 / w²`` counts every scale's error relative to its size. The normaliser (``E[1 / w²]``,
        in closed form) keeps the loss, and so the learning rate and clipping, on the scale of the
        unweighted one."""
        a, b = self.low, self.high
        if self.sampling == "log":
            mean_inverse_square = (1 / a**2 - 1 / b**2) / (2 * math.log(b / a))
        else:
            mean_inverse_square = 1 / (a * b)
        return 1 / (w.float() ** 2 * mean_inverse_square)


def sample_timesteps(
    batch: int, num_train_timesteps: int, generator: torch.Generator, device: torch.device | str
) -> torch.Tensor:
    """Uniform training timesteps ``[B]`` in ``[0, T)``: the sampler, kept apart so that few-step
    students can swap in their own."""
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=generator.device).to(device)


def distillation_loss(
    student: torch.Tensor, target: torch.Tensor, kind: str = "mse", huber_c: float = 0.001
) -> torch.Tensor:
    """Per-sample loss ``[B]`` (float32) between the student's and the teacher's predictions."""
    diff = student.float() - target.float()
    if kind == "mse":
        return diff.pow(2).flatten(1).mean(1)
    if kind == "huber":
        return (torch.sqrt(diff.pow(2) + huber_c**2) - huber_c).flatten(1).mean(1)
    raise ValueError(f"unknown loss {kind!r}")


def min_snr_weights(noise_scheduler: Any, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights ``[B]`` (Hang et al. 2023), for epsilon or v targets."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, t)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    # A zero-terminal-SNR schedule has snr = 0 at t = T, where min(snr, gamma) / snr tends to 1.
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
