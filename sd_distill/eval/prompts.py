"""Prompts for the comparison loop: the seed's defaults, prompt files and safe file names."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

# The ten prompts the seed's inf_txt2img_loop.py rendered, kept so old and new grids compare.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "A boy is watching TV",
    "A photo of a person dancing in the rain",
    "A photo of a boy jumping over a fence",
    "A photo of a boy is kicking a ball",
    "A beach with a lot of waves on it",
    "A road that is going down a hill",
    "3d rendering of 5 tennis balls on top of a cake",
    "A person holding a drink of soda",
    "A person is squeezing a lemon",
    "A person holding a cat",
)

MAX_SLUG_CHARS = 60


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # a BOM is not part of line 1
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def slugify(text: str, max_chars: int = MAX_SLUG_CHARS) -> str:
    """A file-name-safe slug: ASCII ``[a-z0-9-]`` only, so no ``/``, ``..``, quotes or
    control characters from a prompt can reach the file system; never empty."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_chars].rstrip("-") or "prompt"


def image_file_name(index: int, prompt: str) -> str:
    """``<index>_<slug>.png``; the index keeps names unique when two prompts share a slug."""
    return f"{index:03d}_{slugify(prompt)}.png"
