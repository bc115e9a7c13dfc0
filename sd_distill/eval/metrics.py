"""How close the distilled images are to the base-with-CFG images (same prompt, same seed).

PSNR and SSIM come from ``torchmetrics.functional.image`` (no torchvision needed). LPIPS and
CLIP score need extra packages/weights (LPIPS pulls torchvision, which would replace the CPU
torch here; CLIP needs downloaded weights), so they are computed only when available and
otherwise reported as ``None`` with the reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from statistics import mean
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

SSIM_KERNEL = 11  # torchmetrics' default gaussian window; images must be at least this big


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 arrays -> float [N, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def psnr_ssim(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> dict[str, Any]:
    """Per-image and mean PSNR (dB, higher = closer), SSIM (1 = identical) and overall MSE."""
    from torchmetrics.functional import mean_squared_error
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    p, t = to_tensor(preds), to_tensor(targets)
    psnr = [float(peak_signal_noise_ratio(p[i : i + 1], t[i : i + 1], data_range=1.0)) for i in range(len(p))]
    # MSE on [0, 1] pixels, all images together: the demo's "closer to the guided teacher" figure
    out: dict[str, Any] = {
        "psnr": mean(psnr),
        "psnr_per_image": psnr,
        "mse": float(mean_squared_error(p.reshape(-1), t.reshape(-1))),
    }
    if min(p.shape[-2:]) < SSIM_KERNEL:
        out.update(ssim=None, ssim_per_image=None, ssim_reason=f"images smaller than the {SSIM_KERNEL}px window")
        return out
    ssim = [
        float(structural_similarity_index_measure(p[i : i + 1], t[i : i + 1], data_range=1.0)) for i in range(len(p))
    ]
    out.update(ssim=mean(ssim), ssim_per_image=ssim)
    return out


def lpips(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> tuple[float | None, str | None]:
    """Mean LPIPS (lower = closer), or ``(None, reason)`` when it cannot run here."""
    try:
        from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity

        value = learned_perceptual_image_patch_similarity(
            to_tensor(preds) * 2 - 1, to_tensor(targets) * 2 - 1, net_type="alex"
        )
        return float(value), None
    except Exception as exc:  # ImportError (torchvision), or its weights cannot be fetched offline
        return None, f"LPIPS unavailable: {type(exc).__name__}: {exc}"


def clip_score(
    images: Sequence[np.ndarray], prompts: Sequence[str], model: str | None
) -> tuple[float | None, str | None]:
    """Mean CLIP score (image-prompt agreement, 0-100) with ``model``, or ``(None, reason)``."""
    if not model:
        return None, "not computed: pass --clip_model (a local or cached CLIP model) to compute it"
    try:
        from torchmetrics.functional.multimodal import clip_score as _clip_score

        imgs = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # uint8 [N, 3, H, W]
        return float(_clip_score(imgs, list(prompts), model_name_or_path=model)), None
    except Exception as exc:
        return None, f"CLIP score unavailable: {type(exc).__name__}: {exc}"


def fidelity(
    preds: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
) -> dict[str, Any]:
    """All pairwise scores of ``preds`` against ``targets`` (uint8 HxWx3 arrays, same order)."""
    out = psnr_ssim(preds, targets)
    out["lpips"], out["lpips_reason"] = lpips(preds, targets)
    if out["lpips"] is None:
        _say_once(out["lpips_reason"])
    return out


@functools.cache  # the same reason for every column and scale: log it once per process
def _say_once(message: str) -> None:
    logger.info("%s", message)
