"""The comparison loop's settings (each field's ``help`` is its flag's help) and :func:`resolve`,
which checks them and decides the base, guidance, prompts and dtype before any model loads."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..constants import (
    CONFIG_FILE_NAME,
    DEFAULT_BASE_MODEL,
    DEFAULT_GUIDANCE_SCALE,
    DTYPE_NAMES,
    HUB_ID,
    LORA_WEIGHTS_NAME,
)
from ..options import build_parser as _build_parser
from ..options import option
from .errors import CompareError
from .prompts import DEFAULT_PROMPTS, read_prompts_file
from .student import check_student_scales, guidance_scales, is_conditioned, is_number

# --scheduler names -> diffusers classes (imported lazily, after validation).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
# Schedulers that need a package beyond diffusers' own requirements (diffusers raises only when sampling).
SCHEDULER_PACKAGES = {"LMSDiscreteScheduler": "scipy"}
TOY_ADHERENCE = "sd_distill.toy.checker:caption_adherence"


@dataclass
class CompareConfig:
    ft_model: str = option(
        help="Distilled model: a training output / checkpoint-<step> folder (LoRA) or a fused pipeline folder."
    )
    b_model: Optional[str] = option(
        None,
        f"Base model; default: the base recorded in the folder's {CONFIG_FILE_NAME}, "
        f"else {DEFAULT_BASE_MODEL} (only for a fused pipeline: a LoRA needs a known base).",
    )
    out_dir: str = option("compare_out", "Where grid.png, the per-image PNGs and report.json/.md go.")
    guidance_scale: Optional[float] = option(
        None, f"The base's CFG scale; default: the one recorded by training, else {DEFAULT_GUIDANCE_SCALE}."
    )
    ft_guidance_scale: float = option(
        1.0,
        "A fixed-w student's scale; 1.0 = one UNet pass per step. A w-conditioned student is sampled at the "
        "base's scale(s), one pass per step all the same.",
    )
    guidance_scales: Optional[list[float]] = option(
        None,
        "Several scales, e.g. 2 4 7.5 10: the base with CFG and a w-conditioned student at each (a fixed-w student "
        "at its one scale), a report section per scale and guidance_curve.png. Overrides --guidance_scale.",
        nargs="+",
    )
    also_base_without_cfg: bool = option(False, "Add a third column: the base at guidance 1.")
    prompts: Optional[list[str]] = option(
        None, "Prompts; default: --prompts_file, else the seed's ten prompts.", nargs="+"
    )
    prompts_file: Optional[str] = option(None, "One prompt per line; blank lines and # comments are ignored.")
    seed: int = option(123450011, "Every image is drawn from a fresh torch.Generator(device).manual_seed(seed).")
    num_inference_steps: int = option(50, "Sampling steps of every image.")
    height: Optional[int] = option(None, "Image height; default: the model's native size.")
    width: Optional[int] = option(None, "Image width; default: the model's native size.")
    scheduler: Optional[str] = option(
        None, "Sampler applied to every column; default: keep the model's.", choices=sorted(SCHEDULERS)
    )
    dtype: Optional[str] = option(
        None, "fp16 / bf16 / fp32; default fp16 on CUDA, fp32 on CPU (fp16 on CPU is refused).", choices=DTYPE_NAMES
    )
    device: Optional[str] = option(None, "Default: accelerate's device for this process (CUDA when present).")
    batch_size: int = option(1, "Prompts per pipeline call (one generator per prompt, so images do not depend on it).")
    fuse_lora: bool = option(
        True, "Fuse the LoRA into the distilled UNet copy (off: keep peft layers).", negative_alias="--no_fuse_lora"
    )
    clip_model: Optional[str] = option(
        None, "A local or cached CLIP model for CLIP scores; none by default (no hub here)."
    )
    adherence_scorer: Optional[str] = option(
        TOY_ADHERENCE,
        "'module:function' scoring caption adherence per column: f({column: images}, prompts) -> "
        "{column: score} or None when it does not apply; 'none' turns it off. The default reads the "
        "toy teacher's synthetic scenes and applies only to their captions.",
    )


@dataclass
class Resolved:
    """Everything validated and decided before any model is loaded."""

    ft_path: Path
    ft_kind: str  # "lora" | "pipeline"
    base: str
    base_source: str  # "--b_model" | "recorded" | "default"
    revision: str | None
    variant: str | None
    guidance_scale: float
    guidance_source: str
    prompts: list[str]
    dtype: str
    device: str | None
    recorded: dict[str, Any] = field(default_factory=dict)
    guidance_scales: list[float] | None = None  # --guidance_scales: the several-scales report
    conditioned: bool = False  # the student is told w (time_cond_proj_dim): sampled at any scale in one pass


def build_parser() -> argparse.ArgumentParser:
    return _build_parser(
        CompareConfig,
        "Render prompts with the base model (CFG) and the distilled model (one pass "
        "per step) side by side; write grid.png, per-image PNGs and report.json/.md.",
    )


def parse_args(argv: Sequence[str] | None = None) -> CompareConfig:
    return CompareConfig(**vars(build_parser().parse_args(argv)))


def _read_recorded(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CompareError(f"{path} is not a JSON object")
    return data


def _ft_kind(folder: Path) -> str:
    if (folder / "model_index.json").is_file():
        return "pipeline"
    if (folder / LORA_WEIGHTS_NAME).is_file():
        return "lora"
    ckpts = sorted(p.name for p in folder.glob("checkpoint-*") if p.is_dir())
    hint = f" (it holds {', '.join(ckpts[-3:])}: pass one of them)" if ckpts else ""
    raise CompareError(
        f"--ft_model {folder} has neither {LORA_WEIGHTS_NAME} (a LoRA folder) nor model_index.json "
        f"(a pipeline folder){hint}"
    )


def _check_base(base: str) -> None:
    if Path(base).exists():
        if not (Path(base) / "model_index.json").is_file():
            raise CompareError(f"base model folder {base} has no model_index.json (not a diffusers pipeline)")
    elif not HUB_ID.match(base) or base.startswith("."):
        raise CompareError(f"base model folder not found: {base}")


def _base(config: CompareConfig, kind: str, recorded: dict[str, Any], ft: Path) -> tuple[str, str]:
    recorded_base = recorded.get("pretrained_model_name_or_path")
    if config.b_model:
        return config.b_model, "--b_model"
    if recorded_base:
        return str(recorded_base), "recorded"
    if kind == "pipeline":
        return DEFAULT_BASE_MODEL, "default"
    raise CompareError(
        f"the base model of LoRA folder {ft} is unknown: its {CONFIG_FILE_NAME} records no "
        "pretrained_model_name_or_path; pass --b_model"
    )


def _guidance(config: CompareConfig, recorded: dict[str, Any], ft: Path) -> tuple[float, str]:
    if config.guidance_scale is not None:
        return float(config.guidance_scale), "--guidance_scale"
    value = recorded.get("guidance_scale")
    if value is None:
        return DEFAULT_GUIDANCE_SCALE, "default"
    if not is_number(value) or not math.isfinite(value) or value < 1:
        raise CompareError(
            f"{ft / CONFIG_FILE_NAME} records guidance_scale {value!r}, not a number of at least 1; "
            "pass --guidance_scale"
        )
    return float(value), "recorded"


def _check_recorded(recorded: dict[str, Any], ft: Path) -> None:
    """The recorded names that reach from_pretrained must be strings (a hand-edited config may not be)."""
    for key in ("pretrained_model_name_or_path", "revision", "variant"):
        value = recorded.get(key)
        if value is not None and not isinstance(value, str):
            raise CompareError(
                f"{ft / CONFIG_FILE_NAME} records {key} {value!r}, not a string; fix it or pass --b_model"
            )


def _prompts(config: CompareConfig) -> list[str]:
    if config.prompts:
        prompts = [p for p in config.prompts if p.strip()]
    elif config.prompts_file:
        if not Path(config.prompts_file).is_file():
            raise CompareError(f"--prompts_file not found (or not a file): {config.prompts_file}")
        try:
            prompts = read_prompts_file(config.prompts_file)
        except UnicodeDecodeError as exc:
            raise CompareError(
                f"--prompts_file {config.prompts_file} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                f"offset {exc.start}); save it as UTF-8"
            ) from None
        except OSError as exc:
            raise CompareError(f"cannot read --prompts_file {config.prompts_file}: {exc.strerror or exc}") from None
        if not prompts:
            raise CompareError(f"--prompts_file {config.prompts_file} is empty (no prompts after blank/# lines)")
    else:
        prompts = list(DEFAULT_PROMPTS)
    if not prompts:
        raise CompareError("no prompts given")
    return prompts


def _check_numbers(config: CompareConfig) -> None:
    """Every numeric flag in its range."""
    if config.num_inference_steps < 1:
        raise CompareError("--num_inference_steps must be >= 1")
    if config.batch_size < 1:
        raise CompareError("--batch_size must be >= 1")
    for name in ("height", "width"):
        v = getattr(config, name)
        if v is not None and (v < 8 or v % 8):
            raise CompareError(f"--{name} must be a positive multiple of 8, got {v}")
    if not 0 <= config.seed < 2**64:
        raise CompareError(f"--seed {config.seed} must be in [0, 2**64) (torch.Generator's range)")
    for name in ("guidance_scale", "ft_guidance_scale"):
        v = getattr(config, name)
        if v is not None and not (math.isfinite(v) and v >= 1):
            raise CompareError(f"--{name} {v} must be a number of at least 1 (below 1 a pipeline runs no guidance)")


def _check_device(name: str | None) -> None:
    import torch

    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CompareError(f"--device {name!r} is not a device; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CompareError(f"--device {name} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CompareError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CompareError(f"--device {name} requested but MPS is not available")
    elif device.type != "cpu":
        raise CompareError(f"--device {name}: the comparison renders on cpu, cuda or mps")


def _dtype(config: CompareConfig) -> str:
    import torch  # only now: input errors above are reported without paying for the import

    _check_device(config.device)
    on_cuda = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dtype = config.dtype or ("fp16" if on_cuda else "fp32")
    if dtype not in DTYPE_NAMES:
        raise CompareError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPE_NAMES)}")
    if dtype == "fp16" and not on_cuda:
        raise CompareError("--dtype fp16 is not supported on the CPU; use fp32 (or bf16)")
    return dtype


def resolve(config: CompareConfig) -> Resolved:
    """Validate the inputs and decide the base, guidance, prompts and dtype; loads no model."""
    ft = Path(config.ft_model)
    if not ft.is_dir():
        raise CompareError(f"--ft_model folder not found: {ft}")
    kind = _ft_kind(ft)
    recorded = _read_recorded(ft)
    _check_recorded(recorded, ft)
    base, base_source = _base(config, kind, recorded, ft)
    _check_base(base)
    # The recorded revision/variant describe the recorded base only.
    same_base = base == recorded.get("pretrained_model_name_or_path")
    _check_numbers(config)
    guidance, guidance_source = _guidance(config, recorded, ft)
    scales = guidance_scales(config)
    conditioned = is_conditioned(ft, kind)
    check_student_scales(config, recorded, conditioned, scales or [guidance])
    prompts = _prompts(config)
    check_scheduler(config, base, recorded.get("revision") if same_base else None)
    _check_out_dir(config, prompts, column_keys(config, conditioned, scales), curve=scales is not None)
    return Resolved(
        ft_path=ft,
        ft_kind=kind,
        base=base,
        base_source=base_source,
        revision=recorded.get("revision") if same_base else None,
        variant=recorded.get("variant") if same_base else None,
        guidance_scale=guidance,
        guidance_source=guidance_source,
        prompts=prompts,
        dtype=_dtype(config),
        device=config.device,
        recorded=recorded,
        guidance_scales=scales,
        conditioned=conditioned,
    )


def scale_key(prefix: str, g: float) -> str:
    return f"{prefix}_g{g:g}"


def column_keys(config: CompareConfig, conditioned: bool, scales: list[float] | None) -> list[str]:
    """The report's columns, in grid order (``compare.run`` builds them under these keys): with several
    scales the base with CFG and a w-conditioned student at each (a fixed-w student once)."""
    tail = ["base_nocfg"] if config.also_base_without_cfg else []
    if scales is None:
        return ["base_cfg", "distilled", *tail]
    students = [scale_key("distilled", g) for g in scales] if conditioned else ["distilled"]
    return [scale_key("base_cfg", g) for g in scales] + students + tail


def _check_out_dir(config: CompareConfig, prompts: list[str], keys: list[str], curve: bool) -> None:
    from .outdir import out_dir_error, planned_files  # outdir needs CompareError from here

    out, ft = Path(config.out_dir).resolve(), Path(config.ft_model).resolve()
    if out == ft or ft in out.parents:  # a training folder with foreign files is refused for resume
        raise CompareError(
            f"--out_dir {config.out_dir} is inside --ft_model {config.ft_model}: the comparison's files would "
            "become part of that folder; give an --out_dir of its own"
        )
    error = out_dir_error(Path(config.out_dir), planned_files(prompts, keys, curve))
    if error:
        raise CompareError(error)


def check_scheduler(config: CompareConfig, base: str, revision: str | None) -> None:
    """The sampler every column uses can run: its extra package is installed and it gets enough steps."""
    if config.scheduler is not None and config.scheduler not in SCHEDULERS:
        raise CompareError(f"unknown --scheduler {config.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
    own = _scheduler_config(base, revision)
    name = SCHEDULERS[config.scheduler] if config.scheduler else own.get("_class_name")
    package = SCHEDULER_PACKAGES.get(str(name))
    if package and importlib.util.find_spec(package) is None:
        flag = f"--scheduler {config.scheduler}" if config.scheduler else f"the base's scheduler ({name})"
        raise CompareError(f"{flag} needs the {package} package: pip install {package}, or pass another --scheduler")
    # PNDM's Runge-Kutta warm-up takes 4 steps unless skip_prk_steps (SD's own configs set it)
    if name == "PNDMScheduler" and not own.get("skip_prk_steps", False) and config.num_inference_steps < 4:
        raise CompareError(
            f"PNDM without skip_prk_steps needs --num_inference_steps of at least 4, got "
            f"{config.num_inference_steps}; pass more steps or another --scheduler"
        )
    trained = own.get("num_train_timesteps", 1000)  # diffusers' samplers refuse more steps than that
    if isinstance(trained, int) and config.num_inference_steps > trained:
        raise CompareError(
            f"--num_inference_steps {config.num_inference_steps} is more than the {trained} timesteps the base was "
            f"trained with; pass at most {trained}"
        )


def _scheduler_config(base: str, revision: str | None) -> dict[str, Any]:
    """The base's scheduler_config.json when it is on this machine (a folder or the hub cache), else {}."""
    path: Any = Path(base) / "scheduler" / "scheduler_config.json"
    if not Path(base).exists():
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(base, "scheduler/scheduler_config.json", revision=revision)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8")) if isinstance(path, (str, Path)) else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
