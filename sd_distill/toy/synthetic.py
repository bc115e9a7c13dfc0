"""A synthetic captioned image set: one flat shape on a flat background, deterministic from a seed.

Every caption names five attributes (size, colour, shape, position, background), so a model that
ignores the caption gets most of them wrong; that is what lets the toy teacher show that
classifier-free guidance matters. Images are 32x32: the shapes stay recognisable (the smallest is
10 px across) while a teacher training step on one CPU thread stays cheap (the toy VAE maps them to
a 16x16 latent; at 64x64 each step would cost ~4x more). Shapes are drawn without anti-aliasing so
that ``sd_distill.toy.checker`` can read them back from pixel statistics alone.

A fixed tenth of the attribute combinations never appears in a training caption; their captions are
the held-out prompts of the demo (``held_out_prompts``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32

# Foreground and background palettes are disjoint, so a colour word alone says which role it has.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 70, 235),
    "yellow": (240, 220, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Nominal side (bounding-box extent) in pixels; each image jitters it by up to +-1 px.
SIZES: dict[str, float] = {"small": 10.0, "large": 16.0}
# Nominal bounding-box centre (x, y) in pixels; each image jitters it by up to +-1 px.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (9.0, 9.0),
    "top right": (23.0, 9.0),
    "bottom left": (9.0, 23.0),
    "bottom right": (23.0, 23.0),
    "center": (16.0, 16.0),
}
JITTER_PX = 1.0
# Every attribute a caption names, in ``Scene``'s field order, with its values.
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "size": tuple(SIZES),
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}

# Which combinations are held out is fixed (not tied to a data seed), so every training set made by
# this module leaves out the same prompts.
HELD_OUT_SEED = 2024
HELD_OUT_FRACTION = 0.1


@dataclass(frozen=True)
class Scene:
    """The attributes a caption names."""

    size: str
    colour: str
    shape: str
    position: str
    background: str

    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"in the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every attribute combination (4 colours x 3 shapes x 2 sizes x 5 positions x 3 backgrounds)."""
    return [Scene(*combo) for combo in product(*ATTRIBUTE_VALUES.values())]


def held_out_scenes() -> list[Scene]:
    """The combinations that never appear in a training caption (a fixed 10 %, 36 of 360)."""
    scenes = all_scenes()
    rng = np.random.default_rng(HELD_OUT_SEED)
    idx = rng.choice(len(scenes), size=round(len(scenes) * HELD_OUT_FRACTION), replace=False)
    return [scenes[i] for i in sorted(idx)]


def held_out_prompts() -> list[str]:
    """Captions of the held-out combinations: the demo's and the adherence evaluation's prompts."""
    return [s.caption() for s in held_out_scenes()]


def train_scenes() -> list[Scene]:
    """The combinations training captions are drawn from."""
    held = set(held_out_scenes())
    return [s for s in all_scenes() if s not in held]


def shape_mask(shape: str, cx: float, cy: float, side: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Which of the points ``(xs, ys)`` a ``shape`` with box centre ``(cx, cy)`` and extent ``side`` covers."""
    half = side / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":
        # Isosceles, apex up: the half-width grows from 0 at the top to ``half`` at the base.
        top = cy - half
        return (ys >= top) & (ys <= cy + half) & (np.abs(xs - cx) <= (ys - top) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw ``scene`` as a ``[32, 32, 3]`` uint8 image; ``rng`` jitters size and position."""
    side = SIZES[scene.size]
    cx, cy = POSITIONS[scene.position]
    if rng is not None:
        side += rng.uniform(-JITTER_PX, JITTER_PX)
        cx += rng.uniform(-JITTER_PX, JITTER_PX)
        cy += rng.uniform(-JITTER_PX, JITTER_PX)
    # Pixel centres, so a shape's coverage does not depend on which way it is rounded.
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    mask = shape_mask(scene.shape, cx, cy, side, xs, ys)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    image[mask] = COLOURS[scene.colour]
    return image


def make_dataset(n: int, seed: int, caption_noise: float = 0.0) -> tuple[list[np.ndarray], list[str]]:
    """``n`` images with their captions, drawn uniformly from ``train_scenes()``; same seed, same set.

    ``caption_noise`` is the share of captions that name one attribute wrongly (the image is
    unchanged), like web alt-text that only partly describes its image. A model trained on such
    captions samples the mistakes back without guidance; guidance, which favours images that the
    caption explains better than the empty one, removes most of them. A wrong caption is never a
    held-out one.
    """
    rng = np.random.default_rng(seed)
    noise_rng = np.random.default_rng([seed, 1])  # its own stream: the images do not depend on the noise
    scenes = train_scenes()
    allowed = set(scenes)
    images, captions = [], []
    for i in rng.integers(len(scenes), size=n):
        images.append(render(scenes[i], rng))
        named = _misnamed(scenes[i], noise_rng, allowed) if noise_rng.random() < caption_noise else scenes[i]
        captions.append(named.caption())
    return images, captions


def _misnamed(scene: Scene, rng: np.random.Generator, allowed: set[Scene]) -> Scene:
    """``scene`` with one attribute, drawn uniformly, set to another of its values (within ``allowed``)."""
    while True:
        attribute = str(rng.choice(list(ATTRIBUTE_VALUES)))
        value = str(rng.choice([v for v in ATTRIBUTE_VALUES[attribute] if v != getattr(scene, attribute)]))
        wrong = replace(scene, **{attribute: value})
        if wrong in allowed:
            return wrong


def write_imagefolder(out_dir: str | Path, n: int = 4096, seed: int = 0) -> Path:
    """Write ``n`` PNGs and a ``metadata.jsonl`` (``file_name``, ``text``) to ``out_dir``.

    The folder loads with ``datasets.load_dataset("imagefolder", data_dir=out_dir)`` and is what the
    training CLI's ``--train_data_dir`` expects.
    """
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, captions = make_dataset(n, seed)
    with open(out / "metadata.jsonl", "w") as meta:
        for i, (image, text) in enumerate(zip(images, captions)):
            name = f"{i:05d}.png"
            Image.fromarray(image).save(out / name)
            meta.write(json.dumps({"file_name": name, "text": text}) + "\n")
    logger.info("wrote %d synthetic images (seed %d) to %s", n, seed, out)
    return out
