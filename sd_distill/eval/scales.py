"""The comparison at several guidance scales (``--guidance_scales``): the base with CFG at each
scale beside the student at that scale (one pass per step: a w-conditioned student is told the
scale), a report section per scale, and ``guidance_curve.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import CompareConfig, Resolved, scale_key
from .curve import plot_guidance_curve
from .metrics import fidelity
from .outdir import CURVE_FILE, write_atomic
from .pipelines import UNetCounter
from .render import Column
from .student import is_number


def build_columns(res: Resolved, config: CompareConfig, base: Any, distilled: Any) -> list[Column]:
    """The grid's columns, under the keys ``config.column_keys`` planned."""
    base_counter, student_counter = UNetCounter(base.unet), UNetCounter(distilled.unet)
    nocfg = [Column("base_nocfg", "base (no CFG)", base, 1.0, base_counter)] if config.also_base_without_cfg else []
    # a w-conditioned student takes the scale itself (stock diffusers then runs one pass, no CFG)
    student_scale = res.guidance_scale if res.conditioned else config.ft_guidance_scale
    trained = trained_scale(res)
    if res.guidance_scales is None:
        return [
            Column("base_cfg", "base (CFG)", base, res.guidance_scale, base_counter),
            Column("distilled", "distilled", distilled, student_scale, student_counter),
            *nocfg,
        ]
    columns = [Column(scale_key("base_cfg", g), "base (CFG)", base, g, base_counter) for g in res.guidance_scales]
    if res.conditioned:
        columns += [
            Column(scale_key("distilled", g), "distilled", distilled, g, student_counter) for g in res.guidance_scales
        ]
    else:  # a fixed-w student has one scale: the one it was trained at
        columns.append(
            Column("distilled", f"distilled (fixed w={trained:g})", distilled, student_scale, student_counter)
        )
    return columns + nocfg


def trained_scale(res: Resolved) -> float:
    """The scale a fixed-w student was trained at (recorded by training), not the base's --guidance_scale."""
    value = res.recorded.get("guidance_scale")
    return float(value) if is_number(value) else res.guidance_scale


def per_scale(
    res: Resolved, images: dict[str, list[Any]], adherence: dict[str, float] | None, seconds: dict[str, float]
) -> list[dict[str, Any]]:
    """One report section per scale: the student and the base without CFG against the base with CFG there."""
    sections = []
    for g in res.guidance_scales or []:
        reference = images[scale_key("base_cfg", g)]
        student = scale_key("distilled", g) if res.conditioned else "distilled"
        keys = {"base_cfg": scale_key("base_cfg", g), "distilled": student}
        if "base_nocfg" in images:
            keys["base_nocfg"] = "base_nocfg"
        fid = {
            f"{name}_vs_base_cfg": fidelity(images[key], reference) for name, key in keys.items() if name != "base_cfg"
        }
        sections.append(
            {
                "guidance_scale": g,
                "student_rendered_at_this_scale": res.conditioned or g == trained_scale(res),
                "columns": keys,
                "fidelity": fid,
                "adherence": None if adherence is None else {name: adherence.get(key) for name, key in keys.items()},
                "seconds_per_image": {name: seconds[key] for name, key in keys.items()},
            }
        )
    return sections


def write_curve(res: Resolved, sections: list[dict[str, Any]], out: Path) -> str:
    """Adherence per scale when a scorer applies, else the MSE to the base with CFG."""
    scales = [s["guidance_scale"] for s in sections]
    by_adherence = all(s["adherence"] is not None for s in sections)

    def value(section: dict[str, Any], name: str) -> float | None:
        if name == "distilled" and not section["student_rendered_at_this_scale"]:
            return None
        if by_adherence:
            return section["adherence"].get(name)
        return 0.0 if name == "base_cfg" else section["fidelity"][f"{name}_vs_base_cfg"]["mse"]

    names = ["distilled", "base_cfg"] + (["base_nocfg"] if "base_nocfg" in sections[0]["columns"] else [])
    labels = {"distilled": "student (one pass)", "base_cfg": "base with CFG", "base_nocfg": "base without CFG"}
    lines = {labels[n]: [value(s, n) for s in sections] for n in names}
    ylabel = "caption adherence" if by_adherence else "MSE to the base with CFG at g"
    write_atomic(out / CURVE_FILE, lambda tmp: plot_guidance_curve(scales, lines, ylabel, tmp, Path(res.ft_path).name))
    return CURVE_FILE
