"""The side-by-side comparison loop: base with CFG | distilled (one UNet pass per step) | [base without CFG].

``run(config)`` validates everything first (no model is loaded before the inputs are known to be
usable), loads each pipeline once, renders every prompt with a fresh
``torch.Generator(device).manual_seed(seed)`` per image (so each column is exactly what a stock
diffusers pipeline gives with the same arguments), and writes one PNG per image, then ``grid.png`` and
``report.json`` / ``report.md`` into ``out_dir`` (an earlier run's report is gone before the first PNG).

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

import logging
import os
from pathlib import Path
from typing import Any

from ..processes import gpu_count_error
from .config import CompareConfig, CompareError, column_keys, parse_args, resolve
from .outdir import claim, planned_files, settle
from .pipelines import load_pipelines
from .render import Column, sample
from .report import build_report, columns_report, save_grid, save_images, write_report
from .scales import build_columns, per_scale, write_curve
from .scores import load_scorer, score

logger = logging.getLogger(__name__)


def run(config: CompareConfig) -> dict[str, Any]:
    """Validate, load each pipeline once, render all prompts, write outputs; returns the report
    (on every process: the main process broadcasts it)."""
    res = resolve(config)  # before anything heavy
    scorer = load_scorer(config.adherence_scorer)
    from accelerate.utils import broadcast_object_list, gather_object

    state, device = _process_state(config)
    base, distilled = load_pipelines(res, config, device)
    columns = build_columns(res, config, base, distilled)  # under the keys the output folder was checked for
    logger.info(
        "comparing %s (%s) with base %s (%s) on %d prompts, %s %s, %d process(es)",
        res.ft_path,
        res.ft_kind,
        res.base,
        res.base_source,
        len(res.prompts),
        device,
        res.dtype,
        state.num_processes,
    )

    with state.split_between_processes(list(range(len(res.prompts)))) as mine:
        records = sample(columns, res.prompts, list(mine), config, device, state.is_main_process)
    if state.num_processes > 1:
        records = gather_object(records)

    # (report, failure): every rank learns how the main process's writing went, so none waits forever
    outcome: list[Any] = [None]
    failed: Exception | None = None
    if state.is_main_process:
        try:
            keys = column_keys(config, res.conditioned, res.guidance_scales)
            planned = planned_files(res.prompts, keys, curve=res.guidance_scales is not None)
            claim(Path(config.out_dir), planned)  # withdraws an earlier run's report before the first image
            report = _assemble(columns, records, res, config, device, state.num_processes, scorer, planned)
            outcome[0] = (report, None)
            logger.info("wrote %s", Path(config.out_dir) / "grid.png")
        except Exception as exc:
            failed = exc
            outcome[0] = (None, (isinstance(exc, CompareError), f"{type(exc).__name__}: {exc}"))
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    if failed is not None:
        raise failed
    report, failure = outcome[0]
    if failure is not None:
        user_error, message = failure
        raise CompareError(message) if user_error else RuntimeError(f"the main process failed: {message}")
    return report


def _process_state(config: CompareConfig) -> tuple[Any, Any]:
    """accelerate's view of this process and the device it renders on."""
    import torch
    from accelerate import PartialState

    wants_cpu = (config.device or "").startswith("cpu") or not torch.cuda.is_available()
    too_many = None if wants_cpu else gpu_count_error()
    if too_many is not None:  # the extra ranks would fail on an 'invalid device ordinal' traceback
        raise CompareError(too_many)
    state = PartialState(cpu=wants_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
    device = torch.device(config.device) if config.device else state.device
    if state.num_processes > 1 and device.type == "cuda" and device.index is None:
        device = state.device  # one GPU per process
    if device.type == "cpu":
        device = torch.device("cpu")  # accelerate says "cpu:0"; Generator/pipelines want plain "cpu"
    return state, device


def _assemble(
    columns: list[Column],
    records: list[dict],
    res: Any,
    config: CompareConfig,
    device: Any,
    num_processes: int,
    scorer: Any,
    planned: list[str],
) -> dict[str, Any]:
    """Main process: images (PNGs), then the reports that show them (grid, curve, markdown, json) with
    their scores; never a report before the images it shows are all in place."""
    out = Path(config.out_dir).resolve()
    by = {(r["index"], r["column"]): r["image"] for r in records}
    images = {c.key: [by[(i, c.key)] for i in range(len(res.prompts))] for c in columns}
    files = save_images(images, columns, res.prompts, out)
    stale = settle(out, planned)  # only now that the new images all exist
    if stale:
        logger.info("removed %d file(s) of an earlier run", len(stale))
    save_grid(images, columns, res.prompts, out, config.num_inference_steps)
    cols = columns_report(columns, records, config, device)
    size = next(iter(images.values()))[0].shape[:2]
    if res.guidance_scales is None:
        scores = score(images, res.prompts, config, scorer)
        report = build_report(res, config, columns, cols, scores, files, size, device, num_processes)
    else:
        report = _scales_report(res, config, columns, cols, images, files, size, device, num_processes, scorer, out)
    write_report(report, out)
    return report


def _scales_report(
    res: Any,
    config: CompareConfig,
    columns: list[Column],
    cols: list[dict],
    images: dict[str, list[Any]],
    files: list,
    size: tuple[int, int],
    device: Any,
    num_processes: int,
    scorer: Any,
    out: Path,
) -> dict[str, Any]:
    """The report with a section per guidance scale and the curve (``--guidance_scales``)."""
    from .metrics import clip_score

    adherence = scorer(images, res.prompts) if scorer is not None else None
    sections = per_scale(res, images, adherence, {c["key"]: c["seconds_per_image_median"] for c in cols})
    first = sections[0]["columns"]
    clip_value, clip_reason = clip_score(images[first["distilled"]], res.prompts, config.clip_model)
    scores = {
        "fidelity": sections[0]["fidelity"],
        "fidelity_guidance_scale": sections[0]["guidance_scale"],  # the first scale's (each is in per_scale)
        "adherence": adherence,
        "clip_score": {"value": clip_value, "reason": clip_reason},
    }
    report = build_report(
        res,
        config,
        columns,
        cols,
        scores,
        files,
        size,
        device,
        num_processes,
        speed_pair=(first["base_cfg"], first["distilled"]),
    )
    report.update(
        guidance_scales=res.guidance_scales,
        student_conditioned=res.conditioned,
        per_scale=sections,
        guidance_curve=write_curve(res, sections, out),
    )
    return report


__all__ = ["CompareConfig", "CompareError", "parse_args", "resolve", "run"]
