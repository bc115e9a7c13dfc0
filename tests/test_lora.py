from pathlib import Path

import pytest
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


@pytest.mark.parametrize("targets", ["attention", "resnets_and_attention"])
def test_stock_loading_reproduces_the_trained_adapter_exactly(
    tiny_model_dir: Path, tmp_path: Path, targets: str
) -> None:
    """Every adapted module survives save -> stock ``load_lora_weights``: the loaded UNet's output
    equals the trained one's (a dropped module, e.g. all attention layers, would not), at the trained
    scale alpha / r = 8 (without the adapter metadata diffusers would load it at scale 1)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from sd_distill.lora import (
        DEFAULT_TARGET_MODULES,
        RESNET_AND_ATTENTION_TARGET_MODULES,
        adapter_metadata,
        attach_lora,
        lora_state_dict,
        save_lora,
    )

    modules = DEFAULT_TARGET_MODULES if targets == "attention" else RESNET_AND_ATTENTION_TARGET_MODULES
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    params = attach_lora(unet, rank=4, alpha=32, target_modules=modules)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.3)
    save_lora(lora_state_dict(unet), tmp_path, adapter_metadata(unet))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(tmp_path)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16)
    t = torch.tensor([500])
    cond = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        trained = unet(x, t, cond).sample
        loaded = pipe.unet(x, t, cond).sample
        pipe.unet.disable_adapters()
        base = pipe.unet(x, t, cond).sample
    assert not torch.allclose(trained, base, atol=1e-3)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)

    # The comparison loop loads it the stock way too, and fuses it: the same UNet.
    from sd_distill.eval.config import parse_args, resolve
    from sd_distill.eval.pipelines import load_pipelines

    config = parse_args(["--ft_model", str(tmp_path), "--b_model", str(tiny_model_dir), "--dtype", "fp32"])
    _, distilled = load_pipelines(resolve(config), config, "cpu")
    with torch.no_grad():
        compared = distilled.unet(x, t, cond).sample
    # fusing rounds differently: compare with the adapter's effect, not with float epsilon
    assert (compared - trained).abs().max() < 0.01 * (trained - base).abs().max()
