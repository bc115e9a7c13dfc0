"""The shipped SD-2.1-base configs build the real architecture; the benchmark runs end to end (tiny)."""

from __future__ import annotations

from benchmarks import sd21


def test_configs_build_sd21_base_parameter_counts() -> None:
    # meta device: shapes only, no memory
    unet = sd21.build_unet(meta=True)
    assert sd21.param_count(unet) == sd21.UNET_PARAMS == 865_910_724
    assert sd21.param_count(sd21.build_text_encoder(meta=True)) == sd21.TEXT_ENCODER_PARAMS
    assert sd21.param_count(sd21.build_vae(meta=True)) == sd21.VAE_PARAMS
    assert sd21.build_scheduler().config.beta_schedule == "scaled_linear"
    half = sd21.build_unet(width=0.5, meta=True)  # the seed-design stand-in: same structure, narrower
    assert list(half.config.block_out_channels) == [160, 320, 640, 640]


def test_lora_rank4_size_on_real_unet() -> None:
    from sd_distill.lora import attach_lora

    params = attach_lora(sd21.build_unet(meta=True), rank=4)
    assert sum(p.numel() for p in params) == 829_952  # 3.3 MB in fp32 (BENCHMARKS.md quotes it)


def test_quick_benchmark_runs_on_tiny_model() -> None:
    from benchmarks.bench import main

    results = main(["--tiny", "--quick", "--in_process", "--rounds", "1"])
    names = [row[0] for row in results["rows"]]
    assert any(n.startswith("3.") for n in names)
    assert any(n.startswith("6.") for n in names)
    assert any(n.startswith("8.") for n in names)
    assert results["inference"]["pipeline_s"]["lora_fused"] > 0


def test_flop_count_follows_the_work_done() -> None:
    import torch

    from benchmarks.objectives import count_flops

    layer = torch.nn.Linear(4, 5)

    def step(batch: int) -> float:
        layer(torch.randn(batch, 4)).sum().backward()
        return 0.0

    flops = count_flops({"two": lambda: step(2), "four": lambda: step(4)})
    assert flops["two"] == 2 * (2 * 2 * 4 * 5)  # forward product, and the weight's gradient in the backward
    assert flops["four"] == 2 * flops["two"]
