"""A rule-based caption-adherence checker for images of the synthetic set (``sd_distill.synthetic``).

It reads the five attributes back from pixel statistics, with no learned model:

* background: the median colour of the border ring, nearest background palette colour;
* foreground: the largest 4-connected blob of pixels far from that background colour; its median
  colour gives the colour, its bounding box the size (extent) and the position (box centre);
* shape: an apex-up triangle has about a third of its area in the top half of its box (square and
  circle: half); between square and circle, the fill ratio of the box (1.0 against pi/4) decides.

An image adheres to its caption when all five attributes match. Shuffled captions therefore score
near zero, and a model that ignores its caption scores near zero as well.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from sd_distill.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SIZES, Scene

logger = logging.getLogger(__name__)

ATTRIBUTES = ("size", "colour", "shape", "position", "background")
# A pixel is foreground when its RGB distance (0-255 units) from the background exceeds this; the
# closest foreground/background pair (green on gray) is ~150 apart.
FOREGROUND_DISTANCE = 80.0
MIN_BLOB_PIXELS = 6
LARGE_EXTENT_PX = (SIZES["small"] + SIZES["large"]) / 2
TRIANGLE_TOP_SHARE = 0.4  # top-half share of the area: triangle ~0.25, square/circle ~0.5
SQUARE_FILL = 0.9  # area / box area: square 1.0, circle ~0.8

_CAPTION = re.compile(
    rf"^a (?P<size>{'|'.join(SIZES)}) (?P<colour>{'|'.join(COLOURS)}) (?P<shape>circle|square|triangle)"
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

    blob = _largest_blob(np.linalg.norm(img - bg, axis=-1) > FOREGROUND_DISTANCE)
    area = int(blob.sum())
    if area < MIN_BLOB_PIXELS:
        return reading
    reading["colour"] = _nearest(np.median(img[blob], axis=0), COLOURS)

    ys, xs = np.nonzero(blob)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    reading["size"] = "large" if max(y1 - y0, x1 - x0) >= LARGE_EXTENT_PX else "small"
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    reading["position"] = min(POSITIONS, key=lambda p: float(np.linalg.norm(centre - np.asarray(POSITIONS[p]))))

    mid = (y0 + y1) / 2
    top_share = float((ys + 0.5 < mid).sum() + 0.5 * (ys + 0.5 == mid).sum()) / area
    if top_share < TRIANGLE_TOP_SHARE:
        reading["shape"] = "triangle"
    else:
        reading["shape"] = "square" if area / ((y1 - y0) * (x1 - x0)) >= SQUARE_FILL else "circle"
    return reading


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
