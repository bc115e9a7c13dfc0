"""SD-2.1-base components built from the shipped configs, with random weights (no hub, no download).

``configs/sd21-base/*.json`` are the architecture of ``stabilityai/stable-diffusion-2-1-base``;
weights are random, which is all a speed/memory benchmark needs. ``arch="tiny"`` gives the test
suite's tiny pipeline through the same interface (for a seconds-long smoke run).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).parent / "configs" / "sd21-base"
UNET_PARAMS = 865_910_724  # stabilityai/stable-diffusion-2-1-base unet
TEXT_ENCODER_PARAMS = 340_387_840  # OpenCLIP ViT-H/14 text tower as CLIPTextModel (23 layers)
VAE_PARAMS = 83_653_863


def read_config(name: str) -> dict[str, Any]:
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def unet_config(width: float = 1.0) -> dict[str, Any]:
    """The UNet config; ``width`` < 1 narrows every block (same structure, ~width² parameters)."""
    cfg = read_config("unet")
    if width != 1.0:  # keep channels a multiple of 32 (GroupNorm groups) and of the head counts
        cfg["block_out_channels"] = [int(round(c * width / 32)) * 32 for c in cfg["block_out_channels"]]
    return cfg


def _random_fill_(module: torch.nn.Module, seed: int) -> None:
    """Give meta-device parameters real storage: uniform with variance 1/fan_in for weights,
    1 for norm scales, 0 for biases. Faster than the modules' own init, and the activations
    stay O(1) (no NaN/denormal slow paths that would skew timings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            for name, p in list(mod._parameters.items()):
                if p is None:
                    continue
                t = torch.empty(p.shape, dtype=torch.float32)
                if p.ndim >= 2:
                    bound = math.sqrt(3.0 / p[0].numel())
                    t.uniform_(-bound, bound, generator=g)
                elif name == "weight" and "norm" in (mod_name + type(mod).__name__).lower():
                    t.fill_(1.0)
                else:
                    t.zero_()
                mod._parameters[name] = torch.nn.Parameter(t, requires_grad=p.requires_grad)


def build_unet(width: float = 1.0, seed: int = 0, meta: bool = False) -> torch.nn.Module:
    """SD-2.1-base UNet (random weights); ``meta=True`` builds it without memory (shapes only)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():  # parameters on "meta", buffers real
        unet = UNet2DConditionModel.from_config(unet_config(width))
    if not meta:
        _random_fill_(unet, seed)
    return unet


def build_text_encoder(seed: int = 1, meta: bool = False) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        te = CLIPTextModel(CLIPTextConfig(**read_config("text_encoder")))
    if not meta:
        _random_fill_(te, seed)
    return te.eval().requires_grad_(False)


def build_vae(seed: int = 2, meta: bool = False) -> torch.nn.Module:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    with init_empty_weights():
        vae = AutoencoderKL.from_config(read_config("vae"))
    if not meta:
        _random_fill_(vae, seed)
    return vae.eval().requires_grad_(False)


def build_scheduler() -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(read_config("scheduler"))


def build_tokenizer() -> Any:
    """A tiny character-level CLIP tokenizer (ids < 49408, so any prompt fits the real embedding)."""
    from transformers import CLIPTokenizer

    from sd_distill.toy.tiny import write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tiny_tokenizer(Path(d))
        return CLIPTokenizer.from_pretrained(d, model_max_length=77)


@dataclass
class Parts:
    """What a benchmark case holds; ``None`` where a case does not load that component."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None
    vae: torch.nn.Module | None
    tokenizer: Any
    scheduler: Any
    latent_channels: int
    vae_scale: int  # image size / latent size
    text_dim: int


_tiny_dir: Path | None = None


def _tiny_pipeline() -> Any:
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    from sd_distill.toy.tiny import build_tiny_pipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    global _tiny_dir
    if _tiny_dir is None:
        _tiny_dir = build_tiny_pipeline(Path(tempfile.mkdtemp(prefix="sd-distill-bench-tiny-")))
    return StableDiffusionPipeline.from_pretrained(_tiny_dir, safety_checker=None, requires_safety_checker=False)


def build_parts(arch: str, width: float = 1.0, encoders: bool = True, seed: int = 0) -> Parts:
    """Components of ``arch`` ("sd21" or "tiny"); ``encoders=False`` skips text encoder and VAE."""
    if arch == "tiny":
        pipe = _tiny_pipeline()
        unet = pipe.unet
        if width != 1.0:  # a "narrow" tiny UNet: a fresh copy (the structure is what matters)
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_config(pipe.unet.config)
        te, vae = (pipe.text_encoder, pipe.vae) if encoders else (None, None)
        return Parts(
            unet,
            te,
            vae,
            pipe.tokenizer,
            build_scheduler(),
            4,
            2 ** (len(pipe.vae.config.block_out_channels) - 1),
            pipe.text_encoder.config.hidden_size,
        )
    if arch != "sd21":
        raise ValueError(f"unknown arch {arch!r}")
    unet = build_unet(width, seed)
    te, vae = (build_text_encoder(), build_vae()) if encoders else (None, None)
    vae_cfg = read_config("vae")
    return Parts(
        unet,
        te,
        vae,
        build_tokenizer(),
        build_scheduler(),
        vae_cfg["latent_channels"],
        2 ** (len(vae_cfg["block_out_channels"]) - 1),
        read_config("text_encoder")["hidden_size"],
    )


def build_pipeline(parts: Parts) -> Any:
    """A StableDiffusionPipeline over ``parts`` (needs the encoders)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=parts.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
