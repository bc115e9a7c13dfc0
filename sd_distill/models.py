"""Load the pipeline components for training, in the right dtypes, frozen where they should be."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class Components:
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any
    # True while the VAE and text encoder wait in CPU memory (everything cached, validation still
    # needs them). Recorded where it happens: a module's device ("cuda:0") and accelerate's
    # ("cuda") compare unequal on one GPU, so it can never be inferred from devices.
    encoders_parked: bool = False

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def weight_dtype_for(mixed_precision: str | None) -> torch.dtype:
    """dtype of the frozen weights: half precision when training in mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision or "no", torch.float32)


def torch_dtype(name: str) -> torch.dtype:
    """A --dtype name (fp16 / bf16 / fp32) as the torch dtype."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``module``; cast only when its dtype differs (diffusers warns on needless casts)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)


@contextlib.contextmanager
def _zero3_init_disabled() -> Iterator[None]:
    """Load models whole even under ZeRO-3. accelerate registers its DeepSpeed config with
    transformers whenever the stage is 3 (whatever ``zero3_init_flag`` says), and transformers then
    partitions every model it loads; only the trained UNet is handed to DeepSpeed, so the frozen
    text encoder must not be partitioned. The registration is restored afterwards."""
    from accelerate.state import AcceleratorState, is_initialized
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    plugin = AcceleratorState().deepspeed_plugin if is_initialized() else None  # no accelerator: nothing to lift
    if plugin is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def load_vae(model: str, revision: str | None = None, variant: str | None = None) -> torch.nn.Module:
    """The frozen VAE alone: seconds to load, so latents can be cached (and bad images found)
    before the minutes the UNet and text encoder take."""
    from diffusers import AutoencoderKL

    with _zero3_init_disabled():
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", variant=variant, revision=revision)
    vae.requires_grad_(False)
    return vae.eval()


def load_components(
    model: str, revision: str | None = None, variant: str | None = None, vae: torch.nn.Module | None = None
) -> Components:
    """Load tokenizer, text encoder, VAE (unless given), UNet and the DDPM training scheduler of ``model``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    kw = {"revision": revision}
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kw)
    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer", **kw)
    vae = vae if vae is not None else load_vae(model, revision, variant)
    with _zero3_init_disabled():
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", variant=variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", variant=variant, **kw)
    for frozen in (text_encoder, vae):
        frozen.requires_grad_(False)
        frozen.eval()
    logger.info(
        "loaded %s: UNet %.1f M parameters, prediction_type=%s",
        model,
        sum(p.numel() for p in unet.parameters()) / 1e6,
        noise_scheduler.config.prediction_type,
    )
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler)


def load_frozen_unet(model: str, revision: str | None, variant: str | None) -> torch.nn.Module:
    """A second, frozen UNet: the seed recipe's separate teacher (``--teacher separate``)."""
    from diffusers import UNet2DConditionModel

    with _zero3_init_disabled():
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", revision=revision, variant=variant)
    unet.requires_grad_(False)
    return unet.eval()


@torch.no_grad()
def encode_prompts(tokenizer: Any, text_encoder: torch.nn.Module, prompts: list[str]) -> torch.Tensor:
    """Text embeddings ``[B, 77, D]`` of ``prompts`` (padded to the tokenizer's max length)."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


@torch.no_grad()
def encode_images(
    vae: torch.nn.Module, pixels: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
) -> torch.Tensor:
    """Scaled VAE latents ``[B, 4, H/8, W/8]`` of ``pixels`` in [-1, 1]; one generator per image makes
    each latent independent of the batch it was encoded in."""
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.sample(generator=generator)
    return latents * vae.config.scaling_factor
