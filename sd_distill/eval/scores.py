"""How the columns score: fidelity of the distilled images (and of the base without CFG) to the
base with CFG, caption adherence from a plug-in scorer, and the optional CLIP score."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .config import CompareConfig, CompareError
from .metrics import clip_score, fidelity

# {column key: images} and the prompts -> {column key: score}, or None where the scorer does not apply
AdherenceScorer = Callable[[dict[str, list[Any]], list[str]], "dict[str, float] | None"]


def load_scorer(spec: str | None) -> AdherenceScorer | None:
    """The function named ``'module:function'`` (``None``/``'none'``: no adherence score)."""
    if spec is None or spec.lower() == "none":
        return None
    module, _, name = spec.partition(":")
    try:
        scorer = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise CompareError(
            f"--adherence_scorer {spec!r} is not an importable 'module:function' ({exc}); pass none to turn it off"
        ) from None
    if not callable(scorer):
        raise CompareError(f"--adherence_scorer {spec!r} is not a function")
    return scorer


def score(
    images: dict[str, list[Any]], prompts: list[str], config: CompareConfig, scorer: AdherenceScorer | None
) -> dict[str, Any]:
    """``fidelity``, ``adherence`` and ``clip_score`` of the report, from ``{column key: images}``."""
    base = images["base_cfg"]
    fid = {"distilled_vs_base_cfg": fidelity(images["distilled"], base)}
    if "base_nocfg" in images:  # reference: how far plain w=1 sampling is from CFG
        fid["base_nocfg_vs_base_cfg"] = fidelity(images["base_nocfg"], base)
    clip_value, clip_reason = clip_score(images["distilled"], prompts, config.clip_model)
    return {
        "fidelity": fid,
        "clip_score": {"value": clip_value, "reason": clip_reason},
        "adherence": scorer(images, prompts) if scorer is not None else None,
    }
