"""Shared fixtures: a tiny Stable Diffusion pipeline folder (no hub) and a trained-looking LoRA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine spinning
    OpenMP threads made each 32 px image 10-50x slower (0.08 s -> 1-5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Every test starts and ends without accelerate's process-wide state from another test."""
    from helpers import reset_accelerate_state

    yield
    reset_accelerate_state()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny ``StableDiffusionPipeline`` folder (epsilon prediction)."""
    from sd_distill.toy.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_vpred_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline with a v-prediction scheduler."""
    from sd_distill.toy.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline with a 4x wider UNet (~1 M parameters): big enough that a checkpoint
    holding base weights would stand out against one holding only the adapter."""
    from sd_distill.toy.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("wide-sd"), width=4)


@pytest.fixture(scope="session")
def tiny_lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA folder as training writes it, with non-zero weights (peft zero-inits ``B``,
    so an untrained adapter would change nothing and prove nothing)."""
    import json

    from diffusers import UNet2DConditionModel

    from sd_distill.lora import adapter_metadata, attach_lora, lora_state_dict, save_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    params = attach_lora(unet, rank=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.3)
    folder = tmp_path_factory.mktemp("tiny-lora")
    save_lora(lora_state_dict(unet), folder, adapter_metadata(unet))
    (folder / "sd_distill_config.json").write_text(
        json.dumps({"pretrained_model_name_or_path": str(tiny_model_dir), "guidance_scale": 7.5, "lora_rank": 4})
    )
    return folder
