"""What the comparison leaves in ``out_dir``: one PNG per image, ``grid.png``, ``report.json`` and
``report.md`` (the reports after the images: see outdir.claim)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..files import strict_json
from .config import CompareConfig, CompareError, Resolved
from .grid import make_grid
from .outdir import write_atomic
from .prompts import image_file_name
from .render import Column


def save_images(
    images: dict[str, list[Any]], columns: list[Column], prompts: list[str], out: Path
) -> list[dict[str, Any]]:
    """``<column>/<index>_<slug>.png`` per image; returns the report's file list."""
    from PIL import Image

    files: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        entry: dict[str, Any] = {"index": i, "prompt": prompt, "files": {}}
        for c in columns:
            path = (out / c.key / image_file_name(i, prompt)).resolve()
            if out not in path.parents:  # cannot happen with slugify; a last guard all the same
                raise CompareError(f"refusing to write outside {out}: {path}")
            image = Image.fromarray(images[c.key][i])
            write_atomic(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            entry["files"][c.key] = str(path.relative_to(out))
        files.append(entry)
    return files


def save_grid(images: dict[str, list[Any]], columns: list[Column], prompts: list[str], out: Path, steps: int) -> None:
    """``grid.png``: a report like report.json, so written only once every image it shows is."""
    from PIL import Image

    grid = make_grid(
        [[Image.fromarray(images[c.key][i]) for c in columns] for i in range(len(prompts))],
        [f"{c.title}, w={c.guidance_scale:g}, {steps} steps" for c in columns],
        [f"{i + 1}. {p}" for i, p in enumerate(prompts)],
    )
    write_atomic(out / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))


def columns_report(columns: list[Column], records: list[dict], config: CompareConfig, device: Any) -> list:
    memory_kind = (
        "CUDA max allocated per column"
        if device.type == "cuda"
        else "process peak RSS (whole process: all pipelines, not per column)"
    )
    out = []
    for c in columns:
        mine = [r for r in records if r["column"] == c.key]
        evals = statistics.median(r["unet_evals"] for r in mine)
        out.append(
            {
                "key": c.key,
                "title": c.title,
                "guidance_scale": c.guidance_scale,
                "seconds_per_image_median": statistics.median(r["seconds"] for r in mine),
                "seconds_per_image": [r["seconds"] for r in sorted(mine, key=lambda r: r["index"])],
                "unet_evals_per_image": evals,
                "unet_evals_per_step": evals / config.num_inference_steps,
                "peak_memory_mb": max(r["peak_mb"] for r in mine),
                "memory_kind": memory_kind,
            }
        )
    return out


def build_report(
    res: Resolved,
    config: CompareConfig,
    columns: list[Column],
    cols: list[dict],
    scores: dict[str, Any],
    files: list[dict[str, Any]],
    image_size: tuple[int, int],
    device: Any,
    num_processes: int,
    speed_pair: tuple[str, str] = ("base_cfg", "distilled"),
) -> dict:
    import diffusers
    import torch

    secs = {c["key"]: c["seconds_per_image_median"] for c in cols}
    base_key, student_key = speed_pair
    h, w = image_size
    return {
        "prompts": res.prompts,
        "seed": config.seed,
        "num_inference_steps": config.num_inference_steps,
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
        "columns": cols,
        "speed_ratio_distilled_over_base": secs[base_key] / secs[student_key],
        "speed_ratio_guidance_scale": next(c["guidance_scale"] for c in cols if c["key"] == base_key),
        "speed_ratio_note": "base seconds/image divided by distilled seconds/image (2.0 = distilled twice as fast), "
        "the base with CFG at speed_ratio_guidance_scale (each scale's pair: per_scale)",
        "fidelity": scores["fidelity"],
        "fidelity_guidance_scale": scores.get("fidelity_guidance_scale", res.guidance_scale),
        "clip_score": scores["clip_score"],
        "adherence": scores["adherence"],
        "grid": "grid.png",
        "images": files,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }


def write_report(report: dict[str, Any], out: Path) -> None:
    """report.md, then report.json (last: a complete report.json means a complete folder)."""
    write_atomic(out / "report.md", lambda tmp: tmp.write_text(markdown(report), encoding="utf-8"))
    write_atomic(out / "report.json", lambda tmp: tmp.write_text(strict_json(report, indent=2), encoding="utf-8"))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Base vs distilled",
        "",
        f"- distilled: `{report['models']['ft_model']}` ({report['models']['ft_kind']}); "
        f"base: `{report['models']['b_model']}`",
        f"- {len(report['prompts'])} prompts, seed {report['seed']}, {report['num_inference_steps']} steps, "
        f"{report['width']}x{report['height']}, {report['dtype']} on {report['device']} "
        f"({report['num_processes']} process(es))",
        f"- speed ratio at g = {report['speed_ratio_guidance_scale']:g} (base s/img ÷ distilled s/img): "
        f"**{report['speed_ratio_distilled_over_base']:.2f}x**",
        "",
        "| column | guidance | s/image (median) | UNet evals/image | peak memory (MB) |",
        "|---|---|---|---|---|",
    ]
    for c in report["columns"]:
        lines.append(
            f"| {c['title']} | {c['guidance_scale']} | {c['seconds_per_image_median']:.4f} | "
            f"{c['unet_evals_per_image']:g} | {c['peak_memory_mb']:.0f} |"
        )
    lines += [
        "",
        f"Memory: {report['columns'][0]['memory_kind']}.",
        "",
        f"## Fidelity of distilled to base with CFG at g = {report['fidelity_guidance_scale']:g}",
        "",
    ]
    for name, f in report["fidelity"].items():
        ssim = "n/a" if f["ssim"] is None else f"{f['ssim']:.4f}"
        lpips = "n/a" if f["lpips"] is None else f"{f['lpips']:.4f}"
        lines.append(f"- {name}: PSNR {f['psnr']:.2f} dB, SSIM {ssim}, LPIPS {lpips}")
    if report.get("adherence"):
        lines += ["", "## Caption adherence", ""]
        lines += [f"- {key}: {score:.3f}" for key, score in report["adherence"].items()]
    if report.get("per_scale"):
        lines += _per_scale_markdown(report)
    clip = report["clip_score"]
    lines += [f"- CLIP score: {clip if clip['value'] is not None else 'n/a (' + str(clip['reason']) + ')'}", ""]
    lines += ["![grid](grid.png)", ""]
    return "\n".join(lines)


def _per_scale_markdown(report: dict[str, Any]) -> list[str]:
    kind = (
        "w-conditioned (told g, one pass)" if report["student_conditioned"] else "fixed-w (rendered at its one scale)"
    )
    lines = [
        "",
        f"## Per guidance scale (student: {kind})",
        "",
        f"![guidance curve]({report['guidance_curve']})",
        "",
        "| g | student MSE to CFG(g) | base no-CFG MSE to CFG(g) | adherence CFG / student / no-CFG | "
        "s/img CFG / student |",
        "|---|---|---|---|---|",
    ]
    for s in report["per_scale"]:
        fid, adh, sec = s["fidelity"], s["adherence"] or {}, s["seconds_per_image"]
        nocfg = fid.get("base_nocfg_vs_base_cfg", {}).get("mse")
        adherence = " / ".join(
            "-" if adh.get(k) is None else f"{adh[k]:.2f}" for k in ("base_cfg", "distilled", "base_nocfg")
        )
        lines.append(
            f"| {s['guidance_scale']:g} | {fid['distilled_vs_base_cfg']['mse']:.4f}"
            f"{'' if s['student_rendered_at_this_scale'] else ' (other scale)'} | "
            f"{'-' if nocfg is None else f'{nocfg:.4f}'} | {adherence} | "
            f"{sec['base_cfg']:.3f} / {sec['distilled']:.3f} |"
        )
    return lines
