"""A student told the guidance scale: the UNet's own ``time_cond_proj_dim`` mechanism.

Stock ``StableDiffusionPipeline`` skips CFG when ``unet.config.time_cond_proj_dim`` is set and passes
``timestep_cond = get_guidance_scale_embedding(guidance_scale - 1, D)`` instead, one UNet call per
step. A student trained with that embedding of ``w - 1`` (and the teacher's ``u + w (c - u)``) is
therefore sampled at any ``guidance_scale`` by stock diffusers once ``cond_proj`` is in place.

``cond_proj`` is a plain ``Linear(D, C)`` inside ``time_embedding`` (not a LoRA layer: peft's adapter
switch does not touch it, and the teacher pass simply gets no ``timestep_cond``). It starts at zero,
so the untrained student equals the teacher, and is saved beside the LoRA in its own file, since
stock ``load_lora_weights`` rejects non-LoRA keys.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .constants import CONFIG_FILE_NAME, GUIDANCE_PROJ_KEY, GUIDANCE_PROJ_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from .files import replace_atomically
from .lora import fp32_master_weights, gathered, lora_state_dict, save_lora

DEFAULT_GUIDANCE_EMBEDDING_DIM = 256  # what diffusers' LCM scripts and released LCM UNets use


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """``[B, dim]`` float32; equals ``StableDiffusionPipeline.get_guidance_scale_embedding(w, dim)``.

    Always computed in float32 (sin/cos of arguments up to ~1e4 lose everything in half precision);
    callers cast the result. Feed it ``guidance_scale - 1``, as the pipeline does.
    """
    w = w.float().reshape(-1) * 1000.0  # in the pipeline's order of operations, so equal to the last bit
    angles = w[:, None] * _frequencies(dim, w.device)[None, :]
    return torch.nn.functional.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim % 2))


def _frequencies(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[dim // 2]``: each sin/cos pair turns by this many radians as ``1000 w`` grows by 1."""
    half = dim // 2
    return torch.exp(
        torch.arange(half, dtype=torch.float32, device=device) * -(torch.log(torch.tensor(10000.0)) / (half - 1))
    )


# A feature that turns by more than this per unit of w is, for w drawn from a continuous range, noise.
_SMOOTH_RADIANS_PER_UNIT_W = 1.0


@functools.lru_cache(maxsize=8)  # built once per (dim, device), not at every micro-step
def smooth_features(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[dim]`` 0/1 mask of the embedding's slowly turning features (a quarter of them).

    The embedding scales ``w`` by 1000, so three quarters of its features turn by 1 to 1000 radians
    per unit of ``w``: over a range they are pseudo-random numbers, not a description of ``w``. Fed to
    ``cond_proj`` they only add noise (Adam moves a weight on noise as far as one on signal), which
    shows as a student that is good at some scales and off at their neighbours. Trained on the smooth
    features alone, the other columns of ``cond_proj`` stay exactly zero, so the stock pipeline's full
    embedding gives the same output."""
    slow = (1000.0 * _frequencies(dim, device) <= _SMOOTH_RADIANS_PER_UNIT_W).float()
    return torch.nn.functional.pad(torch.cat([slow, slow]), (0, dim % 2))


def student_timestep_cond(
    w: float | torch.Tensor, dim: int, like: torch.Tensor, smooth_only: bool = False
) -> torch.Tensor:
    """The ``timestep_cond`` a student gets at guidance scale(s) ``w`` for the batch ``like`` ``[B, ...]``
    (in training, with ``smooth_only``, its features that turn slowly with ``w``; see :func:`smooth_features`)."""
    scales = torch.as_tensor(w, dtype=torch.float32, device=like.device).reshape(-1).expand(like.shape[0])
    embedding = guidance_embedding(scales - 1, dim)
    if smooth_only:
        embedding = embedding * smooth_features(dim, like.device)
    return embedding.to(like.dtype)


def guidance_projection(unet: torch.nn.Module) -> torch.nn.Linear | None:
    return getattr(unet.time_embedding, "cond_proj", None)


def add_guidance_conditioning(unet: Any, dim: int = DEFAULT_GUIDANCE_EMBEDDING_DIM) -> torch.nn.Linear:
    """Give ``unet`` a zero ``cond_proj`` of input size ``dim`` and record it in its config (a UNet that
    has one of that size keeps it). Call before the LoRA is attached and before ``accelerator.prepare``."""
    existing = guidance_projection(unet)
    if existing is not None:
        if existing.in_features != dim:
            raise ValueError(f"the UNet already takes a {existing.in_features}-dim timestep_cond, not {dim}")
        return existing
    ref = unet.time_embedding.linear_1.weight
    proj = torch.nn.Linear(dim, unet.time_embedding.linear_1.in_features, bias=False)
    proj = proj.to(device=ref.device, dtype=ref.dtype)
    torch.nn.init.zeros_(proj.weight)
    unet.time_embedding.cond_proj = proj
    unet.register_to_config(time_cond_proj_dim=dim)
    return proj


def save_guidance_projection(weight: torch.Tensor, folder: str | Path) -> Path:
    """Write ``cond_proj``'s weight ``[C, D]`` (float32) next to the LoRA, atomically (a full disk is
    one :class:`~sd_distill.files.OutputWriteError` and leaves an earlier file intact)."""
    from safetensors.torch import save_file

    tensor = weight.detach().to("cpu", torch.float32).contiguous()
    meta = {"time_cond_proj_dim": str(tensor.shape[1])}
    return replace_atomically(
        Path(folder) / GUIDANCE_PROJ_WEIGHTS_NAME,
        lambda tmp: save_file({GUIDANCE_PROJ_KEY: tensor}, str(tmp), metadata=meta),
        tensor.numel() * 4,
    )


@dataclass
class StudentWeights:
    """What a student folder holds: the LoRA and, for a w-conditioned student, ``cond_proj``."""

    lora: dict[str, torch.Tensor]
    guidance_projection: torch.Tensor | None = None


def student_weights(unet: Any, engine: Any = None) -> StudentWeights:
    """The student's trained weights on the CPU in float32 (under DeepSpeed pass its ``engine``: the
    optimizer's master copy). Collective under DeepSpeed: call it on every rank."""
    lora = lora_state_dict(unet, engine)
    proj = guidance_projection(unet)
    if proj is None:
        return StudentWeights(lora)
    if engine is not None:
        return StudentWeights(lora, fp32_master_weights(engine, {"cond_proj": proj.weight})["cond_proj"])
    with gathered([proj.weight]):
        return StudentWeights(lora, proj.weight.detach().float().cpu().clone())


def save_student(weights: StudentWeights, folder: str | Path, metadata: dict[str, Any]) -> Path:
    """The guidance projection, if any, then the LoRA file (with its adapter metadata). The LoRA comes last
    because it marks a finished run: a disk that fills between the two leaves no LoRA without its
    projection (which would look finished and load as fixed-w), only an unfinished run to resume."""
    if weights.guidance_projection is not None:
        save_guidance_projection(weights.guidance_projection, folder)
    return save_lora(weights.lora, folder, metadata)


class StudentFolderError(ValueError):
    """A student folder that cannot be loaded as it says it was trained (one line, says how to fix it)."""


def read_guidance_projection(folder: str | Path) -> torch.Tensor | None:
    """``cond_proj``'s weight ``[C, D]`` from a student folder (or a hub repo id), ``None`` for a fixed-w
    student. A folder whose recorded config says it was trained on a range but that lacks the file is
    refused: loaded without it, the student would be sampled with CFG as if fixed-w, silently wrong."""
    path = _student_file(folder, GUIDANCE_PROJ_WEIGHTS_NAME)
    if path is None:
        if _recorded_range(folder) is not None:
            raise StudentFolderError(
                f"{folder} holds a --guidance_scale_range student (its {CONFIG_FILE_NAME} says so) but not its "
                f"{GUIDANCE_PROJ_WEIGHTS_NAME}: copy that file from the training folder beside the LoRA"
            )
        return None
    from safetensors.torch import load_file

    try:
        weight = load_file(str(path)).get(GUIDANCE_PROJ_KEY)
    except Exception as exc:  # a truncated or foreign file: safetensors' own error types vary
        raise StudentFolderError(f"cannot read {path}: {exc}; copy it again from the training folder") from None
    if weight is None or weight.ndim != 2:
        raise StudentFolderError(f"{path} holds no 2-D {GUIDANCE_PROJ_KEY}: not an sd-distill guidance projection")
    return weight


def load_guidance_projection(unet: Any, folder: str | Path) -> bool:
    """Add ``cond_proj`` to ``unet`` from ``folder`` if the folder has one; returns whether it had."""
    weight = read_guidance_projection(folder)
    if weight is None:
        return False
    _set_projection(unet, weight)
    return True


def _set_projection(unet: Any, weight: torch.Tensor) -> None:
    channels = unet.time_embedding.linear_1.in_features
    if weight.shape[0] != channels:
        raise StudentFolderError(
            f"the guidance projection maps to {weight.shape[0]} time-embedding channels, this UNet has {channels}: "
            "the student was trained on another base model"
        )
    proj = add_guidance_conditioning(unet, weight.shape[1])
    with gathered([proj.weight]), torch.no_grad():  # ZeRO-3: into the partitioned weight
        proj.weight.copy_(weight.to(proj.weight))


def _student_file(folder: str | Path, name: str) -> Path | None:
    """``folder/name`` when it exists: a local folder, else a hub repo id (downloaded, or from the cache)."""
    text = str(folder)
    if Path(folder).is_dir():
        path = Path(folder) / name
        return path if path.is_file() else None
    if Path(folder).exists():
        raise StudentFolderError(f"{text} is a file: give the student's folder (or a hub repo id)")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):  # a student on the hub is 'owner/name'
        raise StudentFolderError(f"student folder not found: {text} (give a training folder or a hub repo id)")
    from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(text, name))
    except LocalEntryNotFoundError:  # offline: the cache may have learnt that the repo has no such file
        if try_to_load_from_cache(text, name) is _CACHED_NO_EXIST:
            return None
        raise
    except EntryNotFoundError:  # the hub says the repo has no such file: a fixed-w student has none
        return None


def _recorded_range(folder: str | Path) -> list[float] | None:
    """The ``guidance_scale_range`` a student folder's training config records, if it has one."""
    import json

    try:
        path = _student_file(folder, CONFIG_FILE_NAME)
        recorded = json.loads(path.read_text(encoding="utf-8")) if path is not None else {}
    except (OSError, ValueError):
        return None  # no readable record: nothing to hold the folder to (a LoRA from elsewhere)
    return recorded.get("guidance_scale_range") if isinstance(recorded, dict) else None


class UnconditionedView(torch.nn.Module):
    """A w-conditioned UNet seen as the plain base by a pipeline: its config has no
    ``time_cond_proj_dim``, so stock ``StableDiffusionPipeline`` runs real CFG and passes no
    ``timestep_cond`` (cond_proj is then never called). For the teacher's validation images."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.unet = unet
        self._view = FrozenDict({**unet.config, "time_cond_proj_dim": None})

    @property
    def config(self) -> Any:
        return self._view

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.unet(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)


# Set on a pipeline's UNet by load_student: what it loaded, so that unload_student takes exactly that away.
_LOADED = "_sd_distill_student"


def load_student(pipe: Any, folder: str | Path, adapter_name: str | None = None) -> Any:
    """Load an sd-distill student into a stock pipeline: ``cond_proj`` (w-conditioned students), then the
    LoRA. Afterwards ``pipe(prompt, guidance_scale=g)`` makes one UNet call per step at any ``g`` for a
    w-conditioned student; a fixed-w student is loaded the same way and sampled at ``guidance_scale=1``.
    ``folder`` is a training folder or a hub repo id. One student per pipeline: :func:`unload_student`
    gives the base back (``pipe.unload_lora_weights()`` alone would leave ``cond_proj``, and so one-pass
    sampling, in place). A load that fails leaves the pipeline as it was."""
    unet = pipe.unet
    loaded = getattr(unet, _LOADED, None)
    if loaded is not None:
        raise StudentFolderError(
            f"this pipeline already holds the student {loaded['folder']}: call sd_distill.unload_student(pipe) first"
        )
    if guidance_projection(unet) is not None:
        raise StudentFolderError(
            f"this pipeline's UNet already takes timestep_cond (time_cond_proj_dim={unet.config.time_cond_proj_dim}; "
            "an LCM UNet or a fused export?): an sd-distill student is trained on, and loads into, the plain base"
        )
    weight = read_guidance_projection(folder)
    if weight is not None:
        _set_projection(unet, weight)
    before = set(_adapter_names(pipe))
    try:
        pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS_NAME, adapter_name=adapter_name)
    except BaseException:
        if weight is not None:
            _remove_projection(unet)
        raise
    added = [n for n in _adapter_names(pipe) if n not in before]
    setattr(unet, _LOADED, {"folder": str(folder), "adapters": added, "projection": weight is not None})
    return pipe


def unload_student(pipe: Any) -> Any:
    """Take the student :func:`load_student` loaded out of ``pipe`` again: its LoRA adapter and its
    ``cond_proj`` (with ``time_cond_proj_dim``), so that ``pipe`` samples as the base with CFG."""
    unet = pipe.unet
    loaded = getattr(unet, _LOADED, None)
    if loaded is None:
        raise StudentFolderError("this pipeline holds no student loaded by sd_distill.load_student")
    if set(loaded["adapters"]) & set(getattr(pipe, "fused_loras", ())):  # diffusers remembers, even once unloaded
        raise StudentFolderError(
            "the student's LoRA was fused into this pipeline's weights, so it cannot be taken out again: call "
            "pipe.unfuse_lora() first if its LoRA layers are still there, else load the base pipeline anew"
        )
    present = [n for n in loaded["adapters"] if n in _adapter_names(pipe)]  # pipe.unload_lora_weights() took all
    if present:
        pipe.delete_adapters(present)
    if loaded["projection"]:
        _remove_projection(unet)
    delattr(unet, _LOADED)
    return pipe


def _adapter_names(pipe: Any) -> list[str]:
    return [n for names in pipe.get_list_adapters().values() for n in names]


def _remove_projection(unet: Any) -> None:
    unet.time_embedding.cond_proj = None  # what TimestepEmbedding holds when built without cond_proj_dim
    unet.register_to_config(time_cond_proj_dim=None)
