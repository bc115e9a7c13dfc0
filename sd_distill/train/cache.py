"""Precompute what does not change between epochs: VAE latents and text embeddings.

The main process encodes every readable row once and writes one safetensors file (atomically)
under ``--cache_dir``; every rank then reads it, so later epochs (and later runs with the same
settings) touch only the UNet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ..models import Components, encode_images, encode_prompts
from .data import ImageCaptionDataset

logger = logging.getLogger(__name__)


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

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.latents is None:
            item = self.base[i]
        else:  # no image to decode; the caption is needed only when its embedding is not cached
            item = {
                "caption": self.base.caption(i) if self.text_embeddings is None else "",
                "index": i,
                "latents": self.latents[i],
            }
        if self.text_embeddings is not None:
            item["text_embeddings"] = self.text_embeddings[i]
        return item


def cache_key(config: Any, base: ImageCaptionDataset, dtype: torch.dtype) -> str:
    """Changes whenever anything the cached tensors depend on changes."""
    fingerprint = getattr(base.table, "_fingerprint", None) or str(len(base.table))
    parts = {
        "model": config.pretrained_model_name_or_path,
        "revision": config.revision,
        "variant": config.variant,
        "data": fingerprint,
        "rows": hashlib.sha1(repr(base.rows).encode()).hexdigest(),
        "resolution": config.resolution,
        "center_crop": config.center_crop,
        "flip": config.random_flip,
        "seed": config.seed,
        "latents": config.cache_latents,
        "text": config.cache_text_embeddings,
        "dtype": str(dtype),
    }
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def build_cached_dataset(
    config: Any, base: ImageCaptionDataset, components: Components, accelerator: Any, batch_size: int = 16
) -> CachedDataset:
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    dtype = components.unet.dtype if not config.cache_latents else components.vae.dtype
    cache_dir = Path(config.cache_dir or Path(config.output_dir) / "cache")
    path = cache_dir / f"cache-{cache_key(config, base, dtype)}.safetensors"
    if accelerator.is_main_process and not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, list[torch.Tensor]] = {"latents": [], "text_embeddings": []}
        spec = base.spec
        generator = torch.Generator(device=components.vae.device).manual_seed(spec.seed)
        for start in tqdm(range(0, len(base), batch_size), desc="caching latents/text", leave=False):
            rows = [base.table[base.rows[i]] for i in range(start, min(start + batch_size, len(base)))]
            if config.cache_latents:  # epoch 0's crops and flips, as the uncached epoch 0 draws them
                pixels = torch.stack(
                    [spec.pixels(r[spec.image_column], base.rows[start + k], 0) for k, r in enumerate(rows)]
                )
                tensors["latents"].append(encode_images(components.vae, pixels, generator).cpu())
            if config.cache_text_embeddings:
                captions = [spec.caption(r) for r in rows]
                tensors["text_embeddings"].append(
                    encode_prompts(components.tokenizer, components.text_encoder, captions).cpu()
                )
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({k: torch.cat(v).contiguous() for k, v in tensors.items() if v}, str(tmp))
        os.replace(tmp, path)
        logger.info("cached %d rows to %s (%.1f MB)", len(base), path, path.stat().st_size / 2**20)
    accelerator.wait_for_everyone()
    loaded = load_file(str(path))
    return CachedDataset(base, loaded.get("latents"), loaded.get("text_embeddings"))
