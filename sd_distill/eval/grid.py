"""A captioned image grid: rows = prompts, columns = samplers, drawn with PIL's default font.

Layout (all sizes fixed, so the grid's pixel size depends only on N, K and the image size)::

    +-----------------+-----------------+
    | column title 1  | column title 2  |   header: HEADER_LINES text lines
    +-----------------+-----------------+
    | 1. prompt one, wrapped over the   |   caption: CAPTION_LINES lines, full row width
    | whole row width …                 |
    +-----------------+-----------------+
    |     image       |     image       |   cell: the image, scaled up by an integer factor
    +-----------------+-----------------+   when it is narrower than MIN_CELL_WIDTH (tiny models)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 12
LINE_HEIGHT = 15  # px per text line (FONT_SIZE plus leading)
PAD = 4  # px around text blocks
HEADER_LINES = 2
CAPTION_LINES = 3
MIN_CELL_WIDTH = 192  # tiny (e.g. 32 px) images are upscaled (nearest) so captions stay legible
HEADER_HEIGHT = HEADER_LINES * LINE_HEIGHT + 2 * PAD
CAPTION_HEIGHT = CAPTION_LINES * LINE_HEIGHT + 2 * PAD
ELLIPSIS = "..."


def cell_scale(image_width: int) -> int:
    """Integer upscaling factor for cells: 1 for ordinary sizes, more for tiny images."""
    return max(1, math.ceil(MIN_CELL_WIDTH / image_width))


def grid_size(n_rows: int, n_cols: int, image_width: int, image_height: int) -> tuple[int, int]:
    """(width, height) in pixels of the grid :func:`make_grid` draws."""
    s = cell_scale(image_width)
    return n_cols * image_width * s, HEADER_HEIGHT + n_rows * (CAPTION_HEIGHT + image_height * s)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow's built-in font (FreeType when available, else the bitmap one): no font files.
    return ImageFont.load_default(size=FONT_SIZE)


def wrap_text(text: str, draw: ImageDraw.ImageDraw, font, max_width: int, max_lines: int) -> list[str]:
    """Greedy word wrap into at most ``max_lines`` lines of ``max_width`` px; words longer
    than a line are split, and text that does not fit ends with an ellipsis."""

    def fits(s: str) -> bool:
        return draw.textlength(s, font=font) <= max_width

    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        while not fits(word) and len(word) > 1:  # hard-split an over-long word
            cut = 1
            while cut < len(word) and fits(word[: cut + 1]):
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not fits(last + ELLIPSIS):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + ELLIPSIS]
    return lines


def _draw_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: list[str], font) -> None:
    x, y = xy
    for i, line in enumerate(lines):
        try:
            draw.text((x, y + i * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
        except UnicodeEncodeError:  # the bitmap fallback font is latin-1 only
            safe = line.encode("latin-1", "replace").decode("latin-1")
            draw.text((x, y + i * LINE_HEIGHT), safe, fill=(0, 0, 0), font=font)


def make_grid(
    rows: Sequence[Sequence[Image.Image]],
    column_titles: Sequence[str],
    row_captions: Sequence[str],
) -> Image.Image:
    """Draw ``rows[i][j]`` (prompt i, column j; all images one size) with a title over each
    column and a wrapped caption over each row; returns an RGB image of :func:`grid_size`."""
    if not rows or len(rows) != len(row_captions):
        raise ValueError("need one caption per row and at least one row")
    n_cols = len(column_titles)
    if any(len(r) != n_cols for r in rows):
        raise ValueError("every row needs one image per column title")
    w, h = rows[0][0].size
    s = cell_scale(w)
    cw, ch = w * s, h * s
    width, height = grid_size(len(rows), n_cols, w, h)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font()

    for j, title in enumerate(column_titles):
        lines = wrap_text(title, draw, font, cw - 2 * PAD, HEADER_LINES)
        _draw_lines(draw, (j * cw + PAD, PAD), lines, font)
    y = HEADER_HEIGHT
    for images, caption in zip(rows, row_captions):
        draw.rectangle((0, y, width - 1, y + CAPTION_HEIGHT - 1), fill=(235, 235, 235))
        _draw_lines(draw, (PAD, y + PAD), wrap_text(caption, draw, font, width - 2 * PAD, CAPTION_LINES), font)
        y += CAPTION_HEIGHT
        for j, image in enumerate(images):
            if image.size != (w, h):
                raise ValueError(f"all images must be {w}x{h}, got {image.size[0]}x{image.size[1]}")
            cell = image.convert("RGB")
            if s > 1:
                cell = cell.resize((cw, ch), Image.Resampling.NEAREST)  # exact pixels, just bigger
            grid.paste(cell, (j * cw, y))
        y += ch
    return grid
