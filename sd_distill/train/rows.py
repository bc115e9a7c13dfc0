"""One row of a table -> one training example: decode, convert, resize, crop, flip, caption.

Every consumer (the map-style dataset, the stream and the latent cache) goes through
:meth:`DataSpec.example`, whose crop and flip draw from a generator seeded by ``(seed, epoch, row)``:
a resumed run, and a cache built for epoch 0, see exactly the crops and flips training draws.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps


@dataclass
class DataSpec:
    """Which columns hold the image and the caption, and how an image becomes the training tensor."""

    image_column: str
    caption_column: str
    resolution: int
    center_crop: bool
    random_flip: bool
    seed: int
    root: str | None = None

    def pixels(self, value: Any, row_index: int, epoch: int) -> torch.Tensor | None:
        """``[3, R, R]`` in [-1, 1] for the image cell ``value`` of row ``row_index``; ``None`` if unreadable."""
        img = decode_image(value, self.root)
        if img is None:
            return None
        rng = random.Random(hash((self.seed, epoch, row_index)))
        return image_to_tensor(img, self.resolution, self.center_crop, self.random_flip, rng)

    def caption(self, row: dict[str, Any]) -> str:
        return clean_caption(row[self.caption_column])[0]

    def example(self, row: dict[str, Any], row_index: int, epoch: int) -> dict[str, Any] | None:
        """``{"pixel_values", "caption"}`` of ``row``, or ``None`` when its image cannot be decoded."""
        pixels = self.pixels(row[self.image_column], row_index, epoch)
        return None if pixels is None else {"pixel_values": pixels, "caption": self.caption(row)}


def decode_image(value: Any, root: str | None = None) -> Image.Image | None:
    """An RGB PIL image from a dataset cell (bytes/path dict, path string, raw bytes or PIL image);
    ``None`` when it cannot be decoded or is empty. Greyscale, CMYK, palette, alpha and 16-bit
    images are converted."""
    try:
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            img = Image.open(io.BytesIO(data)) if data else Image.open(_join(root, path))
        elif isinstance(value, (bytes, bytearray)):
            img = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            img = Image.open(_join(root, value))
        elif isinstance(value, Image.Image):
            img = value
        else:
            return None
        img.load()
        if img.width == 0 or img.height == 0:
            return None
        return to_rgb(img)
    except Exception:  # any decoder failure (truncated, not an image, missing file) is a bad row
        return None


def _join(root: str | None, path: str) -> str:
    return path if root is None or os.path.isabs(path) else os.path.join(root, path)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited on white and high bit depths scaled, not clipped."""
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        if arr.max() > 255:
            arr = arr * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def image_to_tensor(
    img: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: random.Random
) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop a square, maybe flip; ``[3, R, R]`` in [-1, 1]."""
    scale = resolution / min(img.width, img.height)
    w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        img = ImageOps.mirror(img)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # [R, R, 3]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def clean_caption(value: Any) -> tuple[str, bool]:
    """``(caption, was_bad)``: empty or non-string captions become the empty prompt."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        value = value[0]  # several captions per image: take the first, deterministically
    if isinstance(value, str) and value.strip():
        return value.strip(), False
    return "", True
