"""Timed sampling: every prompt in every column, one fresh seeded generator per image."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import CompareConfig
from .pipelines import UNetCounter


@dataclass
class Column:
    key: str
    title: str
    pipe: Any
    guidance_scale: float
    counter: UNetCounter


def peak_memory_mb(device: Any) -> float:
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


def render(column: Column, prompts: list[str], config: CompareConfig, device: Any) -> tuple[list, float]:
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


def sample(
    columns: list[Column],
    prompts: list[str],
    indices: list[int],
    config: CompareConfig,
    device: Any,
    show_progress: bool,
) -> list[dict[str, Any]]:
    """Render this process's prompts in every column; one record per (prompt, column)."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    records: list[dict[str, Any]] = []
    peak_mb = {c.key: 0.0 for c in columns}  # per column, over this process's batches
    # One uncounted warm-up call per column at the first batch's size: allocations, kernel selection and
    # caches are per shape, so a warm-up at batch 1 left the first batch of --batch_size N paying them.
    warm_up = [prompts[i] for i in indices[: config.batch_size]]
    if warm_up:
        for c in columns:
            render(c, warm_up, config, device)
    bar = tqdm(total=len(indices), desc="prompts", unit="prompt", disable=not show_progress)
    for start in range(0, len(indices), config.batch_size):
        batch = indices[start : start + config.batch_size]
        for c in columns:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rows = c.counter.rows
            images, seconds = render(c, [prompts[i] for i in batch], config, device)
            peak_mb[c.key] = max(peak_mb[c.key], peak_memory_mb(device))
            for i, image in zip(batch, images):
                records.append(
                    {
                        "index": i,
                        "column": c.key,
                        "image": np.asarray(image.convert("RGB")),
                        "seconds": seconds / len(batch),
                        "unet_evals": (c.counter.rows - rows) / len(batch),
                        "peak_mb": peak_mb[c.key],
                    }
                )
        bar.update(len(batch))
    bar.close()
    return records
