"""Precompute what does not change between epochs: VAE latents and text embeddings, split across ranks.

The latent cache is built before the UNet and text encoder load, in the pass that finds unreadable
images: each image is decoded once, by one rank, and bad data still fails before the long loads.
Each rank encodes its chunks (:mod:`.shards`), the parts are assembled in row order, and the local
main process of each machine writes ``latents-<key>.safetensors`` / ``text-<key>.safetensors``
under ``--cache_dir`` (atomically; once where the disk is shared), so later runs with the same
settings decode and encode nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..files import remove_stale_temps
from ..models import Components, encode_images, encode_prompts
from .data import ScanReport
from .loader import ImageCaptionDataset, epoch_and_index
from .rows import DataSpec, clean_caption
from .shards import agree_on_error, every_rank, exchange, my_chunks, save_tensors, space_error

logger = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: one noise generator per row, so the cache does not depend on the number of ranks


class CachedDataset(torch.utils.data.Dataset):
    """Rows of ``base`` with latents and/or text embeddings served from the cache."""

    def __init__(
        self, base: ImageCaptionDataset, latents: torch.Tensor | None, text_embeddings: torch.Tensor | None
    ) -> None:
        self.base, self.latents, self.text_embeddings = base, latents, text_embeddings

    def __len__(self) -> int:
        return len(self.base)

    def select_epoch(self, epoch: int) -> None:
        self.base.select_epoch(epoch)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        epoch, i = epoch_and_index(key, self.base.epoch)
        if self.latents is None:
            item = self.base[(epoch, i)]
            i = item["index"]  # the row served: another one when this one's file vanished
        else:  # no image to decode; the caption is needed only when its embedding is not cached
            item = {
                "caption": self.base.caption(i) if self.text_embeddings is None else "",
                "index": i,
                "latents": self.latents[i],
            }
        if self.text_embeddings is not None:
            item["text_embeddings"] = self.text_embeddings[i]
        return item


@dataclass
class LatentCache:
    latents: torch.Tensor  # [readable rows, C, h, w], in row order
    scan: ScanReport  # which rows were readable: the cache pass is the bad-row scan


def cache_folder(config: Any) -> Path:
    return Path(config.cache_dir or Path(config.output_dir) / "cache")


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()[:16]


def _source(config: Any, table: Any) -> dict[str, Any]:
    fingerprint = getattr(table, "_fingerprint", None) or str(len(table))
    return {"model": config.pretrained_model_name_or_path, "revision": config.revision, "variant": config.variant,
            "data": fingerprint, "table_rows": len(table)}  # fmt: skip


def latent_key(config: Any, table: Any, dtype: torch.dtype) -> str:
    """Changes whenever anything the cached latents depend on changes."""
    crops = {"resolution": config.resolution, "center_crop": config.center_crop, "flip": config.random_flip}
    return _key({**_source(config, table), **crops, "seed": config.seed, "dtype": str(dtype)})


def text_key(config: Any, base: ImageCaptionDataset, dtype: torch.dtype) -> str:
    rows = hashlib.sha1(repr(base.rows).encode()).hexdigest()
    return _key({**_source(config, base.table), "rows": rows, "dtype": str(dtype)})


@torch.no_grad()
def cached_latents(config: Any, table: Any, spec: DataSpec, vae: Any, accelerator: Any) -> LatentCache:
    """The latents of every readable row (epoch 0's crops and flips, as uncached epoch 0 draws them)
    and which rows those are; every rank calls this and encodes only its chunks."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = cache_folder(config) / f"latents-{latent_key(config, table, vae.dtype)}.safetensors"
    if every_rank(accelerator, path.is_file()):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        loaded = load_file(str(path))
        scan = ScanReport(loaded["rows"].tolist(), int(meta["bad_images"]), int(meta["bad_captions"]), len(table))
        return LatentCache(loaded["latents"], scan)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for SD's VAE
    channels, side = vae.config.latent_channels, spec.resolution // scale
    per_row = channels * side * side * vae.dtype.itemsize + 8
    remove_stale_temps(path.parent, f"{path.stem}*")  # a killed run's half file or part (before the collective)
    agree_on_error(accelerator, space_error(path.parent, len(table) * per_row, "latent cache"))
    start = time.perf_counter()
    chunks = my_chunks(len(table), accelerator)
    mine = _encode_latents(table, spec, vae, chunks, (channels, side), accelerator.is_local_main_process)
    parts, shared = exchange(accelerator, path.parent, path.stem, mine)
    rows = torch.cat([p["rows"] for p in parts])
    order = torch.argsort(rows)
    tensors = {"latents": torch.cat([p["latents"] for p in parts])[order], "rows": rows[order]}
    bad_images, bad_captions, _ = (int(v) for v in sum(p["counts"] for p in parts))
    meta = {"bad_images": str(bad_images), "bad_captions": str(bad_captions)}
    if len(order) and bad_images <= config.max_bad_fraction * len(table):  # a failing scan is not kept
        _write(accelerator, path, tensors, meta, shared)
    logger.info(
        "cached the latents of %d rows in %.1f s (rows looked at per rank: %s) in %s",
        len(order), time.perf_counter() - start, [int(p["counts"][2]) for p in parts], path,
    )  # fmt: skip
    return LatentCache(tensors["latents"], ScanReport(tensors["rows"].tolist(), bad_images, bad_captions, len(table)))


def _encode_latents(
    table: Any, spec: DataSpec, vae: Any, chunks: list[range], shape: tuple[int, int], show_progress: bool
) -> dict[str, torch.Tensor]:
    """This rank's part: readable rows, their latents, and (bad images, bad captions, rows looked at)."""
    from tqdm.auto import tqdm

    rows: list[int] = []
    latents: list[torch.Tensor] = []
    bad_images = bad_captions = 0
    for chunk in tqdm(chunks, desc="caching latents", disable=not show_progress, leave=False):
        pixels, kept = [], []
        for i in chunk:
            row = table[i]
            x = spec.pixels(row[spec.image_column], i, 0)
            if x is None:
                bad_images += 1
                continue
            bad_captions += clean_caption(row[spec.caption_column])[1]
            pixels.append(x), kept.append(i)
        if kept:  # one generator per row: a latent does not depend on which rows share its batch
            generators = [torch.Generator().manual_seed((spec.seed * 1_000_003 + i) % 2**63) for i in kept]
            latents.append(encode_images(vae, torch.stack(pixels), generators).cpu())
            rows += kept
    channels, side = shape
    empty = torch.empty(0, channels, side, side, dtype=vae.dtype)
    return {
        "rows": torch.tensor(rows, dtype=torch.int64),
        "latents": torch.cat(latents) if latents else empty,
        "counts": torch.tensor([bad_images, bad_captions, sum(len(c) for c in chunks)], dtype=torch.int64),
    }


@torch.no_grad()
def cached_text(config: Any, base: ImageCaptionDataset, components: Components, accelerator: Any) -> torch.Tensor:
    """Text embeddings ``[rows, L, D]`` of every row's caption; every rank encodes its chunks."""
    from safetensors.torch import load_file

    tokenizer, encoder = components.tokenizer, components.text_encoder
    path = cache_folder(config) / f"text-{text_key(config, base, encoder.dtype)}.safetensors"
    if every_rank(accelerator, path.is_file()):
        return load_file(str(path))["text_embeddings"]
    length, width = tokenizer.model_max_length, encoder.config.hidden_size
    size = len(base) * length * width * encoder.dtype.itemsize
    remove_stale_temps(path.parent, f"{path.stem}*")
    agree_on_error(accelerator, space_error(path.parent, size, "text-embedding cache"))
    start = time.perf_counter()
    chunks = my_chunks(len(base), accelerator)
    embeddings = [encode_prompts(tokenizer, encoder, [base.caption(i) for i in c]).cpu() for c in chunks]
    mine = {
        "positions": torch.tensor([i for c in chunks for i in c], dtype=torch.int64),
        "text_embeddings": torch.cat(embeddings) if embeddings else torch.empty(0, length, width, dtype=encoder.dtype),
    }
    parts, shared = exchange(accelerator, path.parent, path.stem, mine)
    order = torch.argsort(torch.cat([p["positions"] for p in parts]))
    tensors = {"text_embeddings": torch.cat([p["text_embeddings"] for p in parts])[order]}
    _write(accelerator, path, tensors, {}, shared)
    logger.info(
        "cached the text embeddings of %d rows in %.1f s (rows per rank: %s) in %s",
        len(order), time.perf_counter() - start, [len(p["positions"]) for p in parts], path,
    )  # fmt: skip
    return tensors["text_embeddings"]


def _write(accelerator: Any, path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str], shared: bool) -> None:
    """Once where every rank sees the same disk, else by the local main process of each machine."""
    writer = accelerator.is_main_process if shared else accelerator.is_local_main_process
    agree_on_error(accelerator, save_tensors(path, tensors, meta) if writer else None)
