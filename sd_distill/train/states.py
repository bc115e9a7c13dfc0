"""Where the states a student learns at come from: one seam of the recipe.

A *state source* turns a batch of the loader into :class:`TrainingStates` — noisy latents ``x_t`` at
timesteps ``t`` with their prompt embeddings and guidance scales, and the teacher's target when the
source already knows it (a stored trajectory). Today's source noises dataset images, q(x_t | x_0);
trajectory sources are new classes with the same call, not new branches in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..guidance import GuidanceScales, sample_timesteps
from ..models import Components, encode_images, encode_prompts


@dataclass
class TrainingStates:
    """One micro-batch of states: what the teacher is asked about and the student learns at."""

    x_t: torch.Tensor  # [B, C, h, w] noisy latents, in the frozen weights' dtype
    t: torch.Tensor  # [B] integer timesteps
    cond: torch.Tensor  # [B, L, D] prompt embeddings, in the frozen weights' dtype
    w: float | torch.Tensor  # guidance scale: one float, or [B] per sample
    target: torch.Tensor | None = None  # the teacher's guided prediction, when the source stores it


class StateSource(Protocol):
    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> TrainingStates: ...


class NoisedImages:
    """States of dataset images noised as in training a diffusion model (the seed recipe's source).

    Latents and text embeddings come from the cache when the batch has them, else the VAE and the
    text encoder run here. Every random draw uses ``generator``, in a fixed order (VAE sample, caption
    dropout, noise, timesteps, guidance scales), so a resumed run draws exactly what an uninterrupted
    one would.
    """

    def __init__(
        self,
        components: Components,
        uncond_emb: torch.Tensor,
        scales: GuidanceScales,
        caption_dropout: float,
        weight_dtype: torch.dtype,
    ) -> None:
        self.components, self.uncond_emb = components, uncond_emb
        self.scales, self.caption_dropout, self.weight_dtype = scales, caption_dropout, weight_dtype

    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> TrainingStates:
        c, device = self.components, self.uncond_emb.device
        if "latents" in batch:
            latents = batch["latents"].to(device, torch.float32)
        else:
            latents = encode_images(c.vae, batch["pixel_values"], generator).float()  # [B, 4, h, w]
        if "text_embeddings" in batch:
            cond = batch["text_embeddings"].to(device)
        else:
            cond = encode_prompts(c.tokenizer, c.text_encoder, batch["caption"])  # [B, 77, D]
        bsz = latents.shape[0]
        if self.caption_dropout > 0:
            drop = torch.rand(bsz, generator=generator, device=generator.device).to(device) < self.caption_dropout
            cond = torch.where(drop[:, None, None], self.uncond_emb.expand_as(cond).to(cond.dtype), cond)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
        t = sample_timesteps(bsz, c.noise_scheduler.config.num_train_timesteps, generator, device)
        x_t = c.noise_scheduler.add_noise(latents, noise, t).to(self.weight_dtype)  # [B, 4, h, w]
        w = self.scales.draw(bsz, generator, device)
        return TrainingStates(x_t=x_t, t=t, cond=cond.to(self.weight_dtype), w=w)


class StoredStates:
    """States read from a trajectory buffer, each with the teacher's target stored beside it: a step
    on them runs the student alone. ``prompt_embeddings`` ``[P, L, D]`` holds every prompt's embedding
    (the buffer stores prompt indices); no caption dropout, since the target is the prompt's."""

    def __init__(self, prompt_embeddings: torch.Tensor, weight_dtype: torch.dtype) -> None:
        self.prompt_embeddings, self.weight_dtype = prompt_embeddings, weight_dtype

    def __call__(self, batch: dict[str, Any], generator: torch.Generator) -> TrainingStates:
        device = self.prompt_embeddings.device
        cond = self.prompt_embeddings[batch["prompt"].to(device).long()]
        return TrainingStates(
            x_t=batch["states"].to(device, self.weight_dtype),
            t=batch["t"].to(device).long(),
            cond=cond.to(self.weight_dtype),
            w=batch["w"].to(device).float(),
            target=batch["targets"].to(device).float(),
        )
