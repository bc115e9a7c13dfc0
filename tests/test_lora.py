from pathlib import Path

import torch

from helpers import lora_output_change


def test_saved_lora_loads_in_stock_diffusers_and_changes_the_unet(tiny_model_dir: Path, tiny_lora_dir: Path) -> None:
    before, after = lora_output_change(tiny_model_dir, tiny_lora_dir)
    assert not torch.allclose(before, after, atol=1e-4)


def test_adapter_disabled_context_restores_adapter_and_grads(tiny_model_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    from sd_distill.lora import adapter_disabled, adapter_is_enabled, attach_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    params = attach_lora(unet, rank=2)
    assert all(p.requires_grad for p in params)
    with adapter_disabled(unet):
        assert not adapter_is_enabled(unet)
    assert adapter_is_enabled(unet)
    assert all(p.requires_grad for p in params)
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == {
        n for n, p in unet.named_parameters() if ".lora_" in n
    }
