"""The rows a run trains on: the table read and scanned (or its latents cached, which is the scan),
the caches of what does not change, and the loader over them, with its worker processes."""

from __future__ import annotations

import dataclasses
import gc
import os
from typing import Any

import torch

from ..models import Components, load_vae, place
from .config import TrainConfig, resolve_auto_cache
from .data import TrainData, open_table, scan_rows, stream_data, train_data
from .loader import EpochShuffleSampler, collate


def read_data(
    config: TrainConfig, accelerator: Any, weight_dtype: torch.dtype
) -> tuple[TrainConfig, TrainData, Any, torch.Tensor | None]:
    """The resolved config, the readable rows and, when latents are cached, the VAE and the latents:
    that pass decodes every image once and is the bad-row scan (the VAE loads in seconds, so bad data
    still fails before the UNet and text encoder load)."""
    table, spec = open_table(config)
    rows = None if config.streaming else len(table)
    config = resolve_auto_cache(config, rows)  # decided from the data; never changed again
    shards = getattr(table, "num_shards", None) if config.streaming else None  # a stream splits by shard
    config = resolve_workers(config, local_processes(accelerator), shards)
    if config.streaming:
        return config, stream_data(config, table, spec), None, None
    show, main = accelerator.is_local_main_process, accelerator.is_main_process
    if not config.cache_latents:
        return config, train_data(config, table, spec, scan_rows(table, spec, accelerator, show), main), None, None
    from .cache import cached_latents

    vae = load_vae(config.pretrained_model_name_or_path, config.revision, config.variant)
    place(vae, accelerator.device, weight_dtype)
    cache = cached_latents(config, table, spec, vae, accelerator)
    return config, train_data(config, table, spec, cache.scan, main), vae, cache.latents


def make_dataloader(
    config: TrainConfig,
    dataset: Any,
    sampler: EpochShuffleSampler | None,
    seed: int,
    device: torch.device,
    collate_fn: Any = collate,
) -> torch.utils.data.DataLoader:
    workers = config.dataloader_num_workers or 0
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.train_batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        # a stream's epoch reaches its workers only when they start; a map-style epoch travels in the index
        persistent_workers=workers > 0 and sampler is not None,
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),  # keeps iterator creation off the global RNG
    )


def cached_dataset(
    config: TrainConfig, data: TrainData, components: Components, accelerator: Any, latents: torch.Tensor | None
) -> Any:
    """The training rows, with latents and/or text embeddings from the cache when it is on."""
    if latents is None and not config.cache_text_embeddings:
        return data.dataset
    from .cache import CachedDataset, cached_text

    text = cached_text(config, data.dataset, components, accelerator) if config.cache_text_embeddings else None
    dataset = CachedDataset(data.dataset, latents, text)
    if config.cache_latents and config.cache_text_embeddings:
        _release_encoders(components, keep=bool(config.prompts_for_validation))
    return dataset


def _release_encoders(components: Components, keep: bool) -> None:
    """With everything cached the loop never runs the VAE or text encoder: free them (peak RAM
    0.73x on SD-2.1, BENCHMARKS.md row 4), or, when validation still needs them, park them in
    CPU memory while training on a GPU (validation brings them back)."""
    if not keep:
        components.vae = components.text_encoder = None  # type: ignore[assignment]
        gc.collect()
    elif torch.cuda.is_available():
        components.vae.to("cpu"), components.text_encoder.to("cpu")
        components.encoders_parked = True  # recorded here: validation must not guess it from devices
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_workers(config: TrainConfig, local_processes: int, max_workers: int | None = None) -> TrainConfig:
    """``--dataloader_num_workers`` when not given: none when latents are cached (the rows are tensors
    already), else up to 4 per process from this machine's CPUs, and no more than ``max_workers``
    (a stream gives each worker whole shards; extra workers would get none)."""
    if config.dataloader_num_workers is not None:
        return config
    workers = 0 if config.cache_latents else min(4, _cpu_count() // max(1, local_processes))
    if max_workers is not None:
        workers = min(workers, max_workers)
    return dataclasses.replace(config, dataloader_num_workers=workers)


def local_processes(accelerator: Any) -> int:
    """Processes on this machine: torchrun's LOCAL_WORLD_SIZE, else all of them (the safe guess)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1
