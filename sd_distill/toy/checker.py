"""A rule-based caption-adherence checker for images of the synthetic set (``sd_distill.toy.synthetic``).

It reads the five attributes back from pixel statistics, with no learned model:

* background: the median colour of the border ring, nearest background palette colour;
* foreground: the largest 4-connected blob of pixels far from that background colour; its median
  colour gives the colour. The blob is then taken again from the pixels that are also nearer that
  colour than the background, so that specks of other colours (which strong guidance leaves on a
  gray background) do not join it;
* shape, size, position: how much of each pixel in and around the blob the shape covers is read from
  where its colour lies between background and foreground (blurred or block-averaged edges are
  partial). Each candidate shape (circle, square, apex-up triangle) is drawn with that coverage's
  area and centroid, and the one closest to it at half resolution wins; its side gives the size and
  its box centre the position. Area and centroid, unlike a bounding box, hardly move when a speck
  sticks to an edge, and comparing 2x2-pixel cells keeps a ragged one-pixel edge from deciding.

An image adheres to its caption when all five attributes match. Shuffled captions therefore score
near zero, and a model that ignores its caption scores near zero as well.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .synthetic import (
    ATTRIBUTE_VALUES,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    shape_mask,
)

logger = logging.getLogger(__name__)

ATTRIBUTES = tuple(ATTRIBUTE_VALUES)  # size, colour, shape, position, background
# A pixel is foreground when its RGB distance (0-255 units) from the background exceeds this; the
# closest foreground/background pair (green on gray) is ~150 apart.
FOREGROUND_DISTANCE = 80.0
MIN_BLOB_PIXELS = 6
LARGE_EXTENT_PX = (SIZES["small"] + SIZES["large"]) / 2
# Area of each shape relative to the square of its side (bounding-box extent).
SHAPE_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}

_CAPTION = re.compile(
    rf"^a (?P<size>{'|'.join(SIZES)}) (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})"
    rf" in the (?P<position>{'|'.join(POSITIONS)}) on a (?P<background>{'|'.join(BACKGROUNDS)}) background$"
)


def parse_caption(text: str) -> Scene:
    """The attributes a synthetic caption names; ``ValueError`` for any other text."""
    match = _CAPTION.match(text.strip().lower())
    if match is None:
        raise ValueError(f"not a synthetic caption: {text!r}")
    return Scene(**match.groupdict())


def _nearest(colour: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    dists = [np.linalg.norm(colour - np.asarray(palette[n], dtype=np.float64)) for n in names]
    return names[int(np.argmin(dists))]


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (flood fill; images are tiny)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        blob, queue = [], deque([(int(y0), int(x0))])
        while queue:
            y, x = queue.popleft()
            blob.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def _as_rgb255(image: Any) -> np.ndarray:
    """PIL image, uint8 array or float array in [0, 1] -> float64 ``[H, W, 3]`` in 0-255."""
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        return arr[..., :3].astype(np.float64)
    return np.clip(arr[..., :3].astype(np.float64), 0.0, 1.0) * 255.0


def read_scene(image: Any) -> dict[str, str | None]:
    """Read the five attributes from one image; ``None`` for those it cannot read (no foreground)."""
    img = _as_rgb255(image)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    reading: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    reading["background"] = _nearest(bg, BACKGROUNDS)

    to_bg = np.linalg.norm(img - bg, axis=-1)
    far_from_bg = to_bg > FOREGROUND_DISTANCE
    blob = _largest_blob(far_from_bg)
    if blob.sum() < MIN_BLOB_PIXELS:
        return reading
    colour = _nearest(np.median(img[blob], axis=0), COLOURS)
    reading["colour"] = colour
    fg = np.asarray(COLOURS[colour], dtype=np.float64)
    blob = _largest_blob(far_from_bg & (np.linalg.norm(img - fg, axis=-1) < to_bg))
    if blob.sum() < MIN_BLOB_PIXELS:  # the median colour came from specks: read it as no shape
        return reading

    shape, side, centre = _closest_shape(_coverage(img, bg, fg, blob))
    reading["shape"] = shape
    reading["size"] = "large" if side >= LARGE_EXTENT_PX else "small"
    reading["position"] = min(POSITIONS, key=lambda p: float(np.linalg.norm(centre - np.asarray(POSITIONS[p]))))
    return reading


def _coverage(img: np.ndarray, bg: np.ndarray, fg: np.ndarray, blob: np.ndarray) -> np.ndarray:
    """How much of each pixel the shape covers (0-1), from where its colour lies between bg and fg.

    A blurred or block-averaged edge pixel is a mix of the two colours; its share keeps the
    difference between a square's filled corner and a circle's rounded one. Only pixels in or next to
    the blob count, so specks elsewhere add nothing.
    """
    axis = fg - bg
    share = np.clip((img - bg) @ axis / float(axis @ axis), 0.0, 1.0)
    near = blob.copy()
    near[1:] |= blob[:-1]
    near[:-1] |= blob[1:]
    near[:, 1:] |= blob[:, :-1]
    near[:, :-1] |= blob[:, 1:]
    return np.where(near, share, 0.0)


def _closest_shape(cover: np.ndarray) -> tuple[str, float, np.ndarray]:
    """The candidate shape that, drawn with the coverage's area and centroid, best matches it.

    Returns the shape, its side (extent) and its box centre ``(x, y)``.
    """
    h, w = cover.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    area = float(cover.sum())
    gx, gy = float((xs * cover).sum()) / area, float((ys * cover).sum()) / area
    best: tuple[str, float, np.ndarray] = ("", 0.0, np.zeros(2))
    best_err = np.inf
    for shape, rel_area in SHAPE_AREA.items():
        side = float(np.sqrt(area / rel_area))
        # A triangle's centroid lies a third of the way up from its base: move to its box centre.
        cy = gy - side / 6 if shape == "triangle" else gy
        err = float(((_half_res(shape_mask(shape, gx, cy, side, xs, ys)) - _half_res(cover)) ** 2).sum())
        if err < best_err:
            best, best_err = (shape, side, np.array([gx, cy])), err
    return best


def _half_res(mask: np.ndarray) -> np.ndarray:
    """Mean of ``mask`` over each 2x2 cell (an odd last row/column is dropped)."""
    h, w = mask.shape[0] // 2 * 2, mask.shape[1] // 2 * 2
    return mask[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


@dataclass
class AdherenceReport:
    """Fraction of images whose attributes all match their caption, and per attribute."""

    score: float
    per_attribute: dict[str, float] = field(default_factory=dict)
    n: int = 0


def adherence(images: Sequence[Any], captions: Sequence[str]) -> AdherenceReport:
    """Score ``images`` against their ``captions`` (synthetic-grammar captions, one per image)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("no images to score")
    hits = {a: 0 for a in ATTRIBUTES}
    all_hits = 0
    for image, caption in zip(images, captions):
        want = parse_caption(caption)
        got = read_scene(image)
        ok = {a: got[a] == getattr(want, a) for a in ATTRIBUTES}
        for a in ATTRIBUTES:
            hits[a] += ok[a]
        all_hits += all(ok.values())
    n = len(images)
    report = AdherenceReport(all_hits / n, {a: hits[a] / n for a in ATTRIBUTES}, n)
    logger.debug("adherence %.3f over %d images: %s", report.score, n, report.per_attribute)
    return report


def pipeline_adherence(
    pipe: Any,
    prompts: Sequence[str],
    *,
    guidance_scale: float,
    num_inference_steps: int = 20,
    images_per_prompt: int = 1,
    seed: int = 0,
) -> AdherenceReport:
    """Render ``prompts`` with a diffusers text-to-image pipeline and score them.

    One call renders all prompts as one batch, with one seeded generator, so two calls that differ
    only in ``guidance_scale`` start from the same noise.
    """
    import torch

    result = pipe(
        prompt=list(prompts),
        num_images_per_prompt=images_per_prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    captions = [p for p in prompts for _ in range(images_per_prompt)]
    return adherence(list(result.images), captions)


def caption_adherence(images_by_column: dict[str, list[Any]], prompts: list[str]) -> dict[str, float] | None:
    """The comparison loop's adherence scorer: per column, the fraction of images whose scene matches
    its caption, when every prompt is a caption of the synthetic set (``None`` for any other prompts)."""
    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError:
        return None
    return {key: adherence(images, prompts).score for key, images in images_by_column.items()}
