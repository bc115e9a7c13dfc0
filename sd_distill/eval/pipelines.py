"""Load each pipeline of the comparison once: the base, and the distilled one sharing its VAE,
text encoder and tokenizer (with its own UNet copy: the LoRA fused in, or a fused export's UNet)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from ..conditioning import StudentFolderError, load_guidance_projection
from ..constants import LORA_WEIGHTS_NAME
from ..lora import lora_mismatch
from ..models import torch_dtype
from .config import SCHEDULERS, CompareConfig, CompareError, Resolved


class UNetCounter:
    """Counts UNet evaluations: a forward pre-hook adds the batch rows of each call, so a CFG
    call on ``[uncond; cond]`` (2B rows) counts as two evaluations per image, as it costs."""

    def __init__(self, module: Any) -> None:
        self.rows = 0
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.rows += int(sample.shape[0])


def _scheduler_for(pipe: Any, name: str | None) -> Any:
    """A fresh scheduler instance (stateful schedulers must not be shared between pipelines)."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name]) if name else type(pipe.scheduler)
    return cls.from_config(pipe.scheduler.config)


def load_pipelines(res: Resolved, config: CompareConfig, device: Any) -> tuple[Any, Any]:
    """The base pipeline (loaded once) and the distilled one sharing its VAE/text encoder/tokenizer."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    dtype = torch_dtype(res.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if res.revision:
        kwargs["revision"] = res.revision
    if res.variant:
        kwargs["variant"] = res.variant
    try:
        base = StableDiffusionPipeline.from_pretrained(res.base, **kwargs)
    except (OSError, ValueError) as exc:
        hint = ""
        if res.base_source == "recorded" and not Path(res.base).is_absolute():
            hint = " (recorded by training as given: a relative path is relative to where training ran; pass --b_model)"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompareError(f"could not load base model {res.base!r}{hint}: {first[:300]}") from None
    base.set_progress_bar_config(disable=True)
    if base.unet.config.get("time_cond_proj_dim") is not None:  # stock diffusers would skip its CFG
        raise CompareError(
            f"the base model {res.base!r} has a UNet told the guidance scale (time_cond_proj_dim="
            f"{base.unet.config.time_cond_proj_dim}), which stock diffusers samples without CFG: it cannot be the "
            "base with CFG; pass the plain base the student was trained on with --b_model"
        )
    base.scheduler = _scheduler_for(base, config.scheduler)

    if res.ft_kind == "lora":
        unet = copy.deepcopy(base.unet)  # own UNet, shared everything else (see sd_distill.eval.compare)
    else:
        # A fused export is the base with a distilled UNet: take only the UNet from it.
        try:
            unet = UNet2DConditionModel.from_pretrained(res.ft_path, subfolder="unet", dtype=dtype)
        except (OSError, ValueError) as exc:
            raise CompareError(f"could not load the UNet of {res.ft_path}: {exc}") from None
        _check_unet_fits(unet, base.unet, res)
    distilled = StableDiffusionPipeline(
        **{**base.components, "unet": unet, "scheduler": _scheduler_for(base, config.scheduler)}
    )
    distilled.set_progress_bar_config(disable=True)
    if res.ft_kind == "lora":
        _check_lora_fits(base.unet, res)
        try:
            load_guidance_projection(distilled.unet, res.ft_path)  # a w-conditioned student's cond_proj, if any
        except StudentFolderError as exc:
            raise CompareError(str(exc)) from None
        try:
            distilled.load_lora_weights(str(res.ft_path), weight_name=LORA_WEIGHTS_NAME)
        except (OSError, ValueError, RuntimeError) as exc:  # diffusers' message can be one line per layer
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CompareError(f"could not load the LoRA of {res.ft_path} onto {res.base}: {first[:300]}") from None
        if config.fuse_lora:
            distilled.fuse_lora(components=["unet"])
            distilled.unload_lora_weights()  # drop the peft wrappers; the fused weights stay
    base.to(device)
    distilled.to(device)
    return base, distilled


def _check_unet_fits(unet: Any, base_unet: Any, res: Resolved) -> None:
    """A fused export's UNet must take the base's latents and text embeddings at the base's size (else a
    matrix-shape traceback mid-render, or a grid of two sizes)."""
    keys = ("in_channels", "cross_attention_dim", "sample_size")
    differ = [
        f"{k} {unet.config.get(k)} vs {base_unet.config.get(k)}"
        for k in keys
        if unet.config.get(k) != base_unet.config.get(k)
    ]
    if differ:
        raise CompareError(
            f"the UNet of {res.ft_path} does not fit the base {res.base} ({', '.join(differ)}): pass the base it "
            "was exported from with --b_model"
        )


def _check_lora_fits(unet: Any, res: Resolved) -> None:
    mismatch = lora_mismatch(unet, res.ft_path / LORA_WEIGHTS_NAME)
    if mismatch is None:
        return
    recorded = res.recorded.get("pretrained_model_name_or_path")
    hint = recorded if recorded and recorded != res.base else "<the base it was trained on>"
    raise CompareError(f"the LoRA in {res.ft_path} does not fit base {res.base} ({mismatch}); pass --b_model {hint}")
