"""What the folder under comparison is told: a student told w (sampled at the base's scales) or a
fixed-w one, and the scales it is rendered at."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CompareError

if TYPE_CHECKING:
    from .config import CompareConfig

logger = logging.getLogger(__name__)


def is_number(value: Any) -> bool:
    """A JSON number as a recorded config holds it (``True`` is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_conditioned(ft: Path, kind: str) -> bool:
    """A student told w: a LoRA folder with its guidance projection, or a fused UNet with time_cond_proj_dim."""
    if kind == "lora":
        from ..conditioning import StudentFolderError, read_guidance_projection

        try:
            return read_guidance_projection(ft) is not None
        except StudentFolderError as exc:
            raise CompareError(str(exc)) from None
    unet_config = ft / "unet" / "config.json"
    try:
        return json.loads(unet_config.read_text()).get("time_cond_proj_dim") is not None
    except (OSError, ValueError):
        return False


def guidance_scales(config: CompareConfig) -> list[float] | None:
    """``--guidance_scales`` checked: each at least 1, each once, no two the report would name alike."""
    if config.guidance_scales is None:
        return None
    bad = [g for g in config.guidance_scales if not (math.isfinite(g) and g >= 1)]
    if bad:
        raise CompareError(f"--guidance_scales {' '.join(f'{g:g}' for g in bad)}: each scale must be a number >= 1")
    unique = list(dict.fromkeys(config.guidance_scales))  # in the order given, each once
    keys = [f"{g:g}" for g in unique]  # the report's and the images' names
    same = sorted({k for k in keys if keys.count(k) > 1})
    if same:
        raise CompareError(
            f"--guidance_scales: {', '.join(f'{g!r}' for g in unique if f'{g:g}' in same)} differ by less than the "
            f"report names them ({', '.join(same)}); give scales that differ in their first 6 digits"
        )
    return unique


def check_student_scales(
    config: CompareConfig, recorded: dict[str, Any], conditioned: bool, scales: list[float]
) -> None:
    """--ft_guidance_scale is a fixed-w student's; a w-conditioned one is told the scale(s) the base
    runs, and one asked for a scale outside the range it learnt is said to extrapolate."""
    if conditioned and config.ft_guidance_scale != 1.0:
        raise CompareError(
            f"--ft_guidance_scale {config.ft_guidance_scale:g} applies to a fixed-w student; this one is told w and "
            "sampled at --guidance_scale (or each of --guidance_scales) in one pass: leave it out"
        )
    trained = recorded.get("guidance_scale_range")
    numbers = isinstance(trained, list) and all(map(is_number, trained))
    if not conditioned or not numbers or len(trained) != 2:
        return
    outside = [g for g in scales if not trained[0] <= g <= trained[1]]
    if outside:
        logger.warning(
            "guidance scale(s) %s lie outside the range the student was trained on (%g-%g): its images there "
            "are an extrapolation",
            " ".join(f"{g:g}" for g in outside),
            *trained,
        )
