"""Load each pipeline of the comparison once: the base, and the distilled one sharing its VAE,
text encoder and tokenizer (with its own UNet copy: the LoRA fused in, or a fused export's UNet)."""

from __future__ import annotations

import copy
from typing import Any

from ..constants import LORA_WEIGHTS_NAME
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


def torch_dtype(name: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


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
        raise CompareError(f"could not load base model {res.base!r}: {exc}") from None
    base.set_progress_bar_config(disable=True)
    base.scheduler = _scheduler_for(base, config.scheduler)

    if res.ft_kind == "lora":
        unet = copy.deepcopy(base.unet)  # own UNet, shared everything else (see sd_distill.eval.compare)
    else:
        # A fused export is the base with a distilled UNet: take only the UNet from it.
        try:
            unet = UNet2DConditionModel.from_pretrained(res.ft_path, subfolder="unet", dtype=dtype)
        except (OSError, ValueError) as exc:
            raise CompareError(f"could not load the UNet of {res.ft_path}: {exc}") from None
    distilled = StableDiffusionPipeline(
        **{**base.components, "unet": unet, "scheduler": _scheduler_for(base, config.scheduler)}
    )
    distilled.set_progress_bar_config(disable=True)
    if res.ft_kind == "lora":
        try:
            distilled.load_lora_weights(str(res.ft_path), weight_name=LORA_WEIGHTS_NAME)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CompareError(f"could not load the LoRA of {res.ft_path} onto {res.base}: {exc}") from None
        if config.fuse_lora:
            distilled.fuse_lora(components=["unet"])
            distilled.unload_lora_weights()  # drop the peft wrappers; the fused weights stay
    base.to(device)
    distilled.to(device)
    return base, distilled


def _engine_unet(engine: Any) -> Any:
    """Make a DeepSpeed InferenceEngine look like the UNet to the pipeline: calls go through
    the engine, attributes (config, dtype, device, ...) come from the wrapped UNet."""
    import torch

    class EngineUNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.engine = engine

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.engine(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._modules["engine"].module, name)

    return EngineUNet()


def wrap_deepspeed(pipe: Any, dtype: str) -> None:
    """Route ``pipe``'s UNet through ``deepspeed.init_inference``; clear error when it fails."""
    try:
        import deepspeed

        engine = deepspeed.init_inference(pipe.unet, dtype=torch_dtype(dtype), replace_with_kernel_inject=False)
    except Exception as exc:
        raise CompareError(
            f"--deepspeed_inference failed ({type(exc).__name__}: {exc}); run without --deepspeed_inference"
        ) from None
    # Bypass DiffusionPipeline.__setattr__ (it would re-register the wrapper in the config).
    object.__setattr__(pipe, "unet", _engine_unet(engine))
