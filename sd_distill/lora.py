"""Attach, toggle, export and load the student's LoRA adapter (peft under diffusers)."""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .constants import LORA_WEIGHTS_NAME
from .files import replace_atomically

# Attention projections of every transformer block: the usual diffusers LoRA targets.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
# The time embedding's MLP: the only way w reaches a guidance-conditioned student (``cond_proj`` feeds
# it). Trained, it maps w to what each scale needs; frozen, the low scales of a range stayed far from the
# teacher (toy teacher, 3 seeds: MSE at g = 2 fell from 0.0056 to 0.0027 with it, BENCHMARKS.md).
TIME_EMBEDDING_TARGET_MODULES: tuple[str, ...] = ("time_embedding.linear_1", "time_embedding.linear_2")
# Attention, transformer projections and the ResNets (convolutions and their time-embedding input), as
# LCM-LoRA trains. Needed when the caption also reaches the ResNets, as in the toy teacher, whose pooled
# caption joins the time embedding (``addition_embed_type="text"``).
RESNET_AND_ATTENTION_TARGET_MODULES: tuple[str, ...] = DEFAULT_TARGET_MODULES + (
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
)


def attach_lora(
    unet: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
) -> list[torch.nn.Parameter]:
    """Freeze ``unet``, add a LoRA adapter and return its (trainable) parameters."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no UNet module matched --lora_target_modules {list(target_modules)}")
    return params


def lora_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Named LoRA parameters of ``unet`` (whether or not the adapter is enabled)."""
    return {n: p for n, p in unet.named_parameters() if ".lora_" in n}


@contextlib.contextmanager
def adapter_disabled(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run the base UNet (the teacher): the adapter is off inside, and on again afterwards.

    peft's ``enable_adapters`` also restores ``requires_grad`` of the LoRA weights, which
    disabling clears; the ``finally`` makes sure that happens even if the teacher pass raises.
    """
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def adapter_is_enabled(unet: torch.nn.Module) -> bool:
    """True when no LoRA layer of ``unet`` has its adapter disabled."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return all(not m.disable_adapters for m in unet.modules() if isinstance(m, BaseTunerLayer))


def lora_state_dict(unet: torch.nn.Module, engine: Any = None) -> dict[str, torch.Tensor]:
    """The adapter as peft names it (``<module>.lora_A.weight`` / ``lora_B``), on the CPU.

    This is the format current diffusers writes and ``load_lora_weights`` reads. It is *not*
    passed through ``convert_state_dict_to_diffusers``: that renames only the attention keys to the
    old ``lora.down``/``lora.up`` names, and a file mixing both is loaded with every attention
    layer silently dropped (seen with diffusers 0.42.1 once the ResNets are adapted too).

    Under DeepSpeed pass its ``engine``: the weights are then the optimizer's fp32 master copy, not
    the engine's bf16/fp16 module copy (a rounded version of what was trained). That read, like the
    ZeRO-3 gather of partitioned weights, is collective: call this on every rank.
    """
    from peft.utils import get_peft_model_state_dict

    named = lora_parameters(unet)
    if engine is not None:
        return get_peft_model_state_dict(unet, state_dict=fp32_master_weights(engine, named))
    with gathered(list(named.values())):
        state = get_peft_model_state_dict(unet)
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def fp32_master_weights(engine: Any, named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """``{name: fp32 CPU tensor}`` of the trainable ``named`` parameters as DeepSpeed's optimizer holds
    them. ZeRO-1/2/3 keep them behind ``safe_get_full_fp32_param`` (collective: same order on every
    rank); stage 0 with fp16/bf16 in the optimizer's ``fp32_groups``; otherwise the parameter is the
    fp32 weight itself."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters: dict[int, torch.Tensor] = {}
    optimizer = getattr(engine, "optimizer", None)
    for low, high in zip(getattr(optimizer, "fp16_groups", ()), getattr(optimizer, "fp32_groups", ())):
        masters.update({id(lp): hp for lp, hp in zip(low, high)})
    out = {}
    for name, p in named.items():
        if not p.requires_grad:  # the fp32 copy exists only for trainable weights (adapter disabled?)
            raise RuntimeError(f"{name} is frozen; DeepSpeed keeps fp32 weights only for trainable parameters")
        full = safe_get_full_fp32_param(p)
        if full is None:
            full = masters.get(id(p), p.data)
        out[name] = full.detach().float().cpu().clone().contiguous()
    return out


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Gather ZeRO-3-partitioned ``params`` for reading; a no-op for ordinary tensors."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def adapter_metadata(unet: torch.nn.Module) -> dict[str, Any]:
    """The adapter's peft config (rank, alpha, targets, ...) as diffusers stores it in the LoRA file.
    Without it stock ``load_lora_weights`` assumes alpha = rank, i.e. scale 1 instead of alpha / r."""
    config = copy.deepcopy(unet.peft_config["default"].to_dict())  # a fresh dict: diffusers edits it in place
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_lora(state: dict[str, torch.Tensor], folder: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``state`` (from :func:`lora_state_dict`) with its ``metadata`` (:func:`adapter_metadata`)
    as ``folder/pytorch_lora_weights.safetensors``, the file ``StableDiffusionPipeline.load_lora_weights
    (folder)`` reads. Written to a temporary sibling and renamed: a failed write (disk full) raises
    :class:`~sd_distill.files.OutputWriteError` and leaves an earlier file intact."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = sum(t.numel() * t.element_size() for t in state.values())

    def write(tmp: Path) -> None:
        StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers=state,
            weight_name=tmp.name,
            safe_serialization=True,
            unet_lora_adapter_metadata=copy.deepcopy(metadata),
        )

    return replace_atomically(folder / LORA_WEIGHTS_NAME, write, size)


def load_lora_into_unet(unet: torch.nn.Module, folder: str | Path) -> None:
    """Copy the adapter saved in ``folder`` into ``unet``'s existing (attached) adapter."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / LORA_WEIGHTS_NAME))
    state = {k.removeprefix("unet."): v for k, v in state.items()}
    state = convert_unet_state_dict_to_peft(state)
    with gathered(list(lora_parameters(unet).values())):
        result = set_peft_model_state_dict(unet, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA weights in {folder} do not fit this UNet: {unexpected[:3]} …")


# peft-format LoRA keys as training saves them: [unet.]<module>.lora_A.weight / lora_B.weight
_LORA_KEY = re.compile(r"^(?:unet\.)?(?P<module>.+)\.lora_(?P<side>[AB])\.weight$")


def lora_mismatch(unet: Any, lora_file: Path) -> str | None:
    """Why the LoRA in ``lora_file`` does not fit ``unet`` (its first misfit layer), ``None`` when it fits.
    Read from the file's header, before diffusers tries to load it and logs one line per layer."""
    from safetensors import safe_open

    shapes = {name: tuple(p.shape) for name, p in unet.named_parameters()}
    with safe_open(str(lora_file), "pt") as f:
        for key in sorted(f.keys()):
            m = _LORA_KEY.match(key)
            if m is None:  # another LoRA key format: leave it to diffusers
                continue
            module, side = m.group("module"), m.group("side")
            base = shapes.get(f"{module}.weight") or shapes.get(f"{module}.base_layer.weight")
            if base is None:
                return f"its layer {module} is not in this base"
            got = tuple(f.get_slice(key).get_shape())
            dim, what = (1, "input") if side == "A" else (0, "output")  # A: [r, in, ...], B: [out, r, ...]
            if len(got) < 2 or got[dim] != base[dim]:
                size = got[dim] if len(got) > dim else "?"
                return (
                    f"its layers have other shapes: first mismatch {module}, {what} size {size} in the LoRA, "
                    f"{base[dim]} in the base"
                )
    return None
