"""``guidance_curve.png``: a figure of merit against the guidance scale, one line per sampler."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_guidance_curve(
    scales: Sequence[float], lines: Mapping[str, Sequence[float | None]], ylabel: str, path: str | Path, title: str
) -> Path:
    """``lines[name][i]`` is the figure at ``scales[i]`` (``None``: not measured there, e.g. a fixed-w
    student away from its scale). Written without a display (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for (name, values), marker in zip(lines.items(), "osd^v<>", strict=False):
        points = [(g, v) for g, v in zip(scales, values, strict=True) if v is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker=marker, label=name, linestyle="-" if len(points) > 1 else "none")
    ax.set_xlabel("guidance scale g")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return Path(path)
