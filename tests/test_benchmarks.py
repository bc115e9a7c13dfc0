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


def test_step_errors_are_zero_for_the_teacher_itself_and_grow_with_drift(tiny_vpred_model_dir) -> None:
    import copy

    import torch
    from diffusers import StableDiffusionPipeline

    from benchmarks.step_errors import step_errors, stock_inputs
    from sd_distill.models import Components
    from sd_distill.train.on_policy import one_pass

    pipe = StableDiffusionPipeline.from_pretrained(tiny_vpred_model_dir)
    cond, uncond = pipe.encode_prompt(["a red square", "a blue circle"], "cpu", 1, True)
    components = Components(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, pipe.scheduler)
    # at g = 1 guidance is the conditional pass: the base UNet in one pass is the teacher (targets are fp16)
    same = step_errors(components, one_pass(pipe.unet, stock_inputs(pipe.unet)), cond, uncond[:1], 1.0, [0, 1], steps=5)
    assert len(same["off"]) == len(same["on"]) == 5
    assert max(same["off"] + same["on"]) < 1e-6

    other = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        other.conv_out.bias.add_(0.1)  # a student off by a constant at every state
    errors = step_errors(components, one_pass(other, stock_inputs(other)), cond, uncond[:1], 3.0, [0, 1], steps=5)
    assert errors["on"][0] == errors["off"][0] > 1e-3  # both walks start from the same noise
    assert errors["on"] != errors["off"]  # then the student's own walk leaves the teacher's
