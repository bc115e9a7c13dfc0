"""The side-by-side comparison loop: base with CFG | distilled (one UNet pass per step) | [base without CFG].

``run(config)`` validates everything first (no model is loaded before the inputs are known to be
usable), loads each pipeline once, renders every prompt with a fresh
``torch.Generator(device).manual_seed(seed)`` per image (so each column is exactly what a stock
diffusers pipeline gives with the same arguments), and writes ``grid.png``, one PNG per image and
``report.json`` / ``report.md`` into ``out_dir``.

Memory: the distilled pipeline shares the base pipeline's VAE, text encoder and tokenizer and
holds its own copy of the UNet with the LoRA fused in. Why a copy rather than toggling one UNet's
adapter: (1) a fused UNet is a plain UNet, so the distilled column's speed is what users get in
deployment, not slowed by LoRA side branches; (2) the base column runs the untouched base weights,
bit-identical to a stock pipeline (fusing/unfusing into shared weights would leave float residue);
(3) no state flips between columns, which keeps batching/multi-process runs simple. The price is
one extra UNet (about 1.7 GB in fp16 for SD 2.1) while the VAE and text encoder stay shared.
``--no_fuse_lora`` keeps the adapter unfused (peft layers), still on the copy.

Several processes (``accelerate launch``): prompts are split with ``PartialState.split_between_processes``,
images and timings are gathered with ``gather_object``, and the main process writes the outputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sd_distill.prompts import DEFAULT_PROMPTS, image_file_name, read_prompts_file

logger = logging.getLogger(__name__)

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # = sd_distill.lora.LORA_WEIGHTS_NAME (lazy import)
DISTILL_CONFIG_NAME = "sd_distill_config.json"
DEFAULT_BASE = "stabilityai/stable-diffusion-2-1-base"
DEFAULT_GUIDANCE = 7.5
DTYPES = ("fp16", "bf16", "fp32")
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
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CompareError(ValueError):
    """A problem with the user's input; the CLI prints it as one line, without a traceback."""


@dataclass
class CompareConfig:
    ft_model: str
    """Distilled model: a training output / ``checkpoint-<step>`` folder (LoRA) or a fused pipeline folder."""
    b_model: str | None = None
    """Base model; default: the base recorded in the folder's sd_distill_config.json, else SD 2.1 base
    (only for a fused pipeline folder: a LoRA needs a known base)."""
    out_dir: str = "compare_out"
    """Where grid.png, the per-image PNGs and report.json/.md go."""
    guidance_scale: float | None = None
    """The base's CFG scale; default: the one recorded by training, else 7.5."""
    ft_guidance_scale: float = 1.0
    """The distilled model's scale; 1.0 = one UNet pass per step."""
    also_base_without_cfg: bool = False
    """Add a third column: the base at guidance 1."""
    prompts: list[str] | None = None
    """Prompts; default: --prompts_file, else the seed's ten prompts."""
    prompts_file: str | None = None
    """One prompt per line; blank lines and # comments are ignored."""
    seed: int = 123450011
    """Every image is drawn from a fresh torch.Generator(device).manual_seed(seed)."""
    num_inference_steps: int = 50
    height: int | None = None
    """Image height; default: the model's native size."""
    width: int | None = None
    scheduler: str | None = None
    """One of SCHEDULERS, applied to every column; default: keep the model's."""
    dtype: str | None = None
    """fp16 / bf16 / fp32; default fp16 on CUDA, fp32 on CPU (fp16 on CPU is refused)."""
    device: str | None = None
    """Default: accelerate's device for this process (CUDA when present)."""
    batch_size: int = 1
    """Prompts per pipeline call (one generator per prompt, so images do not depend on it)."""
    fuse_lora: bool = True
    """Fuse the LoRA into the distilled UNet copy (off: keep peft layers)."""
    deepspeed_inference: bool = False
    """Wrap each UNet with deepspeed.init_inference."""
    clip_model: str | None = None
    """A local or cached CLIP model for CLIP scores; none by default (no hub here)."""


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


# --------------------------------------------------------------------------- validation


def _read_recorded(folder: Path) -> dict[str, Any]:
    path = folder / DISTILL_CONFIG_NAME
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
    elif not _HUB_ID.match(base) or base.startswith("."):
        raise CompareError(f"base model folder not found: {base}")


def resolve(config: CompareConfig) -> Resolved:
    """Validate the inputs and decide the base, guidance, prompts and dtype; loads no model."""
    ft = Path(config.ft_model)
    if not ft.is_dir():
        raise CompareError(f"--ft_model folder not found: {ft}")
    kind = _ft_kind(ft)
    recorded = _read_recorded(ft)

    recorded_base = recorded.get("pretrained_model_name_or_path")
    if config.b_model:
        base, base_source = config.b_model, "--b_model"
    elif recorded_base:
        base, base_source = str(recorded_base), "recorded"
    elif kind == "pipeline":
        base, base_source = DEFAULT_BASE, "default"
    else:
        raise CompareError(
            f"the base model of LoRA folder {ft} is unknown: its {DISTILL_CONFIG_NAME} records no "
            "pretrained_model_name_or_path; pass --b_model"
        )
    _check_base(base)
    # The recorded revision/variant describe the recorded base only.
    same_base = base == recorded_base
    revision = recorded.get("revision") if same_base else None
    variant = recorded.get("variant") if same_base else None

    if config.guidance_scale is not None:
        guidance, guidance_source = float(config.guidance_scale), "--guidance_scale"
    elif recorded.get("guidance_scale") is not None:
        guidance, guidance_source = float(recorded["guidance_scale"]), "recorded"
    else:
        guidance, guidance_source = DEFAULT_GUIDANCE, "default"

    if config.prompts:
        prompts = [p for p in config.prompts if p.strip()]
    elif config.prompts_file:
        if not Path(config.prompts_file).is_file():
            raise CompareError(f"--prompts_file not found: {config.prompts_file}")
        prompts = read_prompts_file(config.prompts_file)
        if not prompts:
            raise CompareError(f"--prompts_file {config.prompts_file} is empty (no prompts after blank/# lines)")
    else:
        prompts = list(DEFAULT_PROMPTS)
    if not prompts:
        raise CompareError("no prompts given")

    if config.num_inference_steps < 1:
        raise CompareError("--num_inference_steps must be >= 1")
    if config.batch_size < 1:
        raise CompareError("--batch_size must be >= 1")
    for name in ("height", "width"):
        v = getattr(config, name)
        if v is not None and (v < 8 or v % 8):
            raise CompareError(f"--{name} must be a positive multiple of 8, got {v}")
    if config.scheduler is not None and config.scheduler not in SCHEDULERS:
        raise CompareError(f"unknown --scheduler {config.scheduler!r}; choose from {', '.join(SCHEDULERS)}")

    import torch  # only now: input errors above are reported without paying for the import


    on_cuda = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise CompareError(f"--device {config.device} requested but CUDA is not available")
    dtype = config.dtype or ("fp16" if on_cuda else "fp32")
    if dtype not in DTYPES:
        raise CompareError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if dtype == "fp16" and not on_cuda:
        raise CompareError("--dtype fp16 is not supported on the CPU; use fp32 (or bf16)")

    return Resolved(
        ft_path=ft,
        ft_kind=kind,
        base=base,
        base_source=base_source,
        revision=revision,
        variant=variant,
        guidance_scale=guidance,
        guidance_source=guidance_source,
        prompts=prompts,
        dtype=dtype,
        device=config.device,
        recorded=recorded,
    )


# --------------------------------------------------------------------------- models


class UNetCounter:
    """Counts UNet evaluations: a forward pre-hook adds the batch rows of each call, so a CFG
    call on ``[uncond; cond]`` (2B rows) counts as two evaluations per image, as it costs."""

    def __init__(self, module: Any) -> None:
        self.rows = 0
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.rows += int(sample.shape[0])


def _torch_dtype(name: str):
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

    dtype = _torch_dtype(res.dtype)
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
        unet = copy.deepcopy(base.unet)  # own UNet, shared everything else (see module docstring)
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

        engine = deepspeed.init_inference(pipe.unet, dtype=_torch_dtype(dtype), replace_with_kernel_inject=False)
    except Exception as exc:
        raise CompareError(
            f"--deepspeed_inference failed ({type(exc).__name__}: {exc}); run without --deepspeed_inference"
        ) from None
    # Bypass DiffusionPipeline.__setattr__ (it would re-register the wrapper in the config).
    object.__setattr__(pipe, "unet", _engine_unet(engine))


# --------------------------------------------------------------------------- sampling


@dataclass
class Column:
    key: str
    title: str
    pipe: Any
    guidance_scale: float
    counter: UNetCounter


def _peak_memory_mb(device: Any) -> float:
    """CUDA: max allocated since the last reset. CPU: the process's peak RSS (VmHWM; whole process)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _render(column: Column, prompts: list[str], config: CompareConfig, device: Any) -> tuple[list, float]:
    """One pipeline call for ``prompts``; returns (PIL images, seconds)."""
    import torch

    # A fresh generator per image, each seeded alike: image i does not depend on the batch.
    generators = [torch.Generator(device).manual_seed(config.seed) for _ in prompts]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = column.pipe(
            prompts,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=column.guidance_scale,
            height=config.height,
            width=config.width,
            generator=generators if len(generators) > 1 else generators[0],
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out.images, time.perf_counter() - start


def _sample(columns: list[Column], prompts: list[str], indices: list[int], config: CompareConfig, device: Any,
            show_progress: bool) -> list[dict[str, Any]]:
    """Render this process's prompts in every column; one record per (prompt, column)."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []
    peak_mb = {c.key: 0.0 for c in columns}  # per column, over this process's batches
    if indices:  # one uncounted warm-up image per column (allocations, kernel selection, caches)
        for c in columns:
            _render(c, [prompts[indices[0]]], config, device)
    bar = tqdm(total=len(indices), desc="prompts", unit="prompt", disable=not show_progress)
    for start in range(0, len(indices), config.batch_size):
        batch = indices[start : start + config.batch_size]
        for c in columns:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rows = c.counter.rows
            images, seconds = _render(c, [prompts[i] for i in batch], config, device)
            peak_mb[c.key] = max(peak_mb[c.key], _peak_memory_mb(device))
            for i, image in zip(batch, images):
                records.append({
                    "index": i,
                    "column": c.key,
                    "image": np.asarray(image.convert("RGB")),
                    "seconds": seconds / len(batch),
                    "unet_evals": (c.counter.rows - rows) / len(batch),
                    "peak_mb": peak_mb[c.key],
                })
        bar.update(len(batch))
    bar.close()
    return records


# --------------------------------------------------------------------------- outputs


def _columns_report(columns: list[Column], records: list[dict], config: CompareConfig, memory_kind: str) -> list:
    out = []
    for c in columns:
        mine = [r for r in records if r["column"] == c.key]
        evals = statistics.median(r["unet_evals"] for r in mine)
        out.append({
            "key": c.key,
            "title": c.title,
            "guidance_scale": c.guidance_scale,
            "seconds_per_image_median": statistics.median(r["seconds"] for r in mine),
            "seconds_per_image": [r["seconds"] for r in sorted(mine, key=lambda r: r["index"])],
            "unet_evals_per_image": evals,
            "unet_evals_per_step": evals / config.num_inference_steps,
            "peak_memory_mb": max(r["peak_mb"] for r in mine),
            "memory_kind": memory_kind,
        })
    return out


def caption_adherence(images_by_column: dict[str, list[Any]], prompts: list[str]) -> dict[str, float] | None:
    """Fraction of images whose scene matches its caption, per column, when every prompt is a
    caption of the synthetic set the toy teacher learnt (``None`` for any other prompts)."""
    from sd_distill.checker import adherence, parse_caption

    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError:
        return None
    return {key: adherence(images, prompts).score for key, images in images_by_column.items()}


def _write_markdown(report: dict[str, Any], path: Path) -> None:
    lines = [
        "# Base vs distilled",
        "",
        f"- distilled: `{report['models']['ft_model']}` ({report['models']['ft_kind']}); "
        f"base: `{report['models']['b_model']}`",
        f"- {len(report['prompts'])} prompts, seed {report['seed']}, {report['num_inference_steps']} steps, "
        f"{report['width']}x{report['height']}, {report['dtype']} on {report['device']} "
        f"({report['num_processes']} process(es))",
        f"- speed ratio (base s/img ÷ distilled s/img): **{report['speed_ratio_distilled_over_base']:.2f}x**",
        "",
        "| column | guidance | s/image (median) | UNet evals/image | peak memory (MB) |",
        "|---|---|---|---|---|",
    ]
    for c in report["columns"]:
        lines.append(
            f"| {c['title']} | {c['guidance_scale']} | {c['seconds_per_image_median']:.4f} | "
            f"{c['unet_evals_per_image']:g} | {c['peak_memory_mb']:.0f} |"
        )
    lines += ["", f"Memory: {report['columns'][0]['memory_kind']}.", "", "## Fidelity of distilled to base with CFG", ""]
    for name, f in report["fidelity"].items():
        ssim = "n/a" if f["ssim"] is None else f"{f['ssim']:.4f}"
        lpips = "n/a" if f["lpips"] is None else f"{f['lpips']:.4f}"
        lines.append(f"- {name}: PSNR {f['psnr']:.2f} dB, SSIM {ssim}, LPIPS {lpips}")
    if report.get("adherence"):
        lines += ["", "## Caption adherence (synthetic-scene checker)", ""]
        lines += [f"- {key}: {score:.3f}" for key, score in report["adherence"].items()]
    clip = report["clip_score"]
    lines += [f"- CLIP score: {clip if clip['value'] is not None else 'n/a (' + str(clip['reason']) + ')'}", ""]
    lines += ["![grid](grid.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def _assemble(columns: list[Column], records: list[dict], res: Resolved, config: CompareConfig, device: Any,
              num_processes: int) -> dict[str, Any]:
    """Main process: per-image PNGs, grid.png, metrics, report.json/.md."""
    from PIL import Image

    from sd_distill.grid import make_grid
    from sd_distill.metrics import clip_score, fidelity

    out = Path(config.out_dir).resolve()
    prompts = res.prompts
    by = {(r["index"], r["column"]): r["image"] for r in records}
    files: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        entry = {"index": i, "prompt": prompt, "files": {}}
        for c in columns:
            path = (out / c.key / image_file_name(i, prompt)).resolve()
            if out not in path.parents:  # cannot happen with slugify; a last guard all the same
                raise CompareError(f"refusing to write outside {out}: {path}")
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(by[(i, c.key)]).save(path)
            entry["files"][c.key] = str(path.relative_to(out))
        files.append(entry)

    steps = config.num_inference_steps
    grid = make_grid(
        [[Image.fromarray(by[(i, c.key)]) for c in columns] for i in range(len(prompts))],
        [f"{c.title}, w={c.guidance_scale:g}, {steps} steps" for c in columns],
        [f"{i + 1}. {p}" for i, p in enumerate(prompts)],
    )
    grid.save(out / "grid.png")

    memory_kind = (
        "CUDA max allocated per column" if device.type == "cuda"
        else "process peak RSS (whole process: all pipelines, not per column)"
    )
    cols = _columns_report(columns, records, config, memory_kind)
    secs = {c["key"]: c["seconds_per_image_median"] for c in cols}
    base_imgs = [by[(i, "base_cfg")] for i in range(len(prompts))]
    fid = {"distilled_vs_base_cfg": fidelity([by[(i, "distilled")] for i in range(len(prompts))], base_imgs)}
    if any(c.key == "base_nocfg" for c in columns):  # reference: how far plain w=1 sampling is from CFG
        fid["base_nocfg_vs_base_cfg"] = fidelity([by[(i, "base_nocfg")] for i in range(len(prompts))], base_imgs)
    adherence = caption_adherence({c.key: [by[(i, c.key)] for i in range(len(prompts))] for c in columns}, prompts)
    clip_value, clip_reason = clip_score(
        [by[(i, "distilled")] for i in range(len(prompts))], prompts, config.clip_model
    )
    h, w = base_imgs[0].shape[:2]
    import diffusers
    import torch

    report: dict[str, Any] = {
        "prompts": prompts,
        "seed": config.seed,
        "num_inference_steps": steps,
        "guidance_scale": res.guidance_scale,
        "guidance_scale_source": res.guidance_source,
        "ft_guidance_scale": config.ft_guidance_scale,
        "models": {
            "ft_model": str(res.ft_path),
            "ft_kind": res.ft_kind,
            "b_model": res.base,
            "b_model_source": res.base_source,
            "revision": res.revision,
            "variant": res.variant,
            "lora_fused": res.ft_kind == "lora" and config.fuse_lora,
            "recorded_config": res.recorded,
        },
        "scheduler": type(columns[0].pipe.scheduler).__name__,
        "device": str(device),
        "dtype": res.dtype,
        "height": h,
        "width": w,
        "batch_size": config.batch_size,
        "num_processes": num_processes,
        "deepspeed_inference": config.deepspeed_inference,
        "columns": cols,
        "speed_ratio_distilled_over_base": secs["base_cfg"] / secs["distilled"],
        "speed_ratio_note": "base seconds/image divided by distilled seconds/image (2.0 = distilled twice as fast)",
        "fidelity": fid,
        "clip_score": {"value": clip_value, "reason": clip_reason},
        "adherence": adherence,
        "grid": "grid.png",
        "images": files,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    _write_markdown(report, out / "report.md")
    return report


# --------------------------------------------------------------------------- entry point


def run(config: CompareConfig) -> dict[str, Any]:
    """Validate, load each pipeline once, render all prompts, write outputs; returns the report
    (on every process: the main process broadcasts it)."""
    res = resolve(config)  # before anything heavy
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, gather_object

    wants_cpu = (config.device or "").startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=wants_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
    device = torch.device(config.device) if config.device else state.device
    if state.num_processes > 1 and device.type == "cuda" and device.index is None:
        device = state.device  # one GPU per process
    if device.type == "cpu":
        device = torch.device("cpu")  # accelerate says "cpu:0"; Generator/pipelines want plain "cpu"

    base, distilled = load_pipelines(res, config, device)
    if config.deepspeed_inference:
        wrap_deepspeed(base, res.dtype)
        wrap_deepspeed(distilled, res.dtype)
    base_counter, distilled_counter = UNetCounter(base.unet), UNetCounter(distilled.unet)
    columns = [
        Column("base_cfg", "base (CFG)", base, res.guidance_scale, base_counter),
        Column("distilled", "distilled", distilled, config.ft_guidance_scale, distilled_counter),
    ]
    if config.also_base_without_cfg:
        columns.append(Column("base_nocfg", "base (no CFG)", base, 1.0, base_counter))
    logger.info(
        "comparing %s (%s) with base %s (%s) on %d prompts, %s %s, %d process(es)",
        res.ft_path, res.ft_kind, res.base, res.base_source, len(res.prompts), device, res.dtype, state.num_processes,
    )

    with state.split_between_processes(list(range(len(res.prompts)))) as mine:
        records = _sample(columns, res.prompts, list(mine), config, device, state.is_main_process)
    if state.num_processes > 1:
        records = gather_object(records)

    report: list[Any] = [None]
    if state.is_main_process:
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        report[0] = _assemble(columns, records, res, config, device, state.num_processes)
        logger.info("wrote %s", Path(config.out_dir) / "grid.png")
    if state.num_processes > 1:
        broadcast_object_list(report)
    return report[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Render prompts with the base model (CFG) and the distilled model (one pass per step) "
        "side by side; write grid.png, per-image PNGs and report.json/.md."
    )
    p.add_argument("--ft_model", required=True, help="LoRA output / checkpoint-<step> folder, or fused pipeline folder")
    p.add_argument("--b_model", default=None, help=f"base model (default: recorded base, else {DEFAULT_BASE})")
    p.add_argument("--out_dir", default="compare_out")
    p.add_argument("--guidance_scale", type=float, default=None, help="base CFG scale (default: recorded, else 7.5)")
    p.add_argument("--ft_guidance_scale", type=float, default=1.0)
    p.add_argument("--also_base_without_cfg", action="store_true")
    p.add_argument("--prompts", nargs="+", default=None)
    p.add_argument("--prompts_file", default=None)
    p.add_argument("--seed", type=int, default=123450011)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS))
    p.add_argument("--dtype", default=None, choices=DTYPES)
    p.add_argument("--device", default=None)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--no_fuse_lora", dest="fuse_lora", action="store_false", help="keep the LoRA unfused")
    p.add_argument("--deepspeed_inference", action="store_true", help="wrap the UNets with deepspeed.init_inference")
    p.add_argument("--clip_model", default=None, help="CLIP model for CLIP scores (local or cached)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> CompareConfig:
    return CompareConfig(**vars(build_parser().parse_args(argv)))


__all__ = ["CompareConfig", "CompareError", "build_parser", "parse_args", "resolve", "run"]
