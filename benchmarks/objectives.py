"""Step time by objective on the SD-2.1-base UNet architecture (random weights), CPU, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.objectives --resolution 256 --rounds 5 [--out f.json]
        [--only VARIANT ...]  [--flops]

One UNet with a rank-4 LoRA (and a zero-initialised ``cond_proj``), cached latents and text
embeddings, batch 1, AdamW; the variants are interleaved round by round (``bench.interleave``):

- ``fixed_w``: today's step — noised image states, the teacher's batched ``[∅; c]`` pass, the student;
- ``w_conditioned``: the same with ``--guidance_scale_range 1.5 10`` (the student is told w);
- ``w_conditioned_time_embedding``: that, with the LoRA also on the time embedding (a range's default), own UNet;
- ``buffered``: a trajectory-buffer step — stored state and target, the student alone;
- ``forward_fixed`` / ``forward_w``: one no-grad UNet call without / with ``timestep_cond`` (a sampling step);
- ``walk_state``: generating one buffer state (a CFG teacher pass and a DDIM step), from ``trajectories.walk``.

``--only`` times a subset (more rounds in the same time); ``--flops`` also counts each variant's FLOPs once,
a figure this CPU's few-percent scatter of timings cannot move.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from typing import Any

import torch

from benchmarks.bench import interleave
from benchmarks.sd21 import build_unet


def main() -> None:
    from diffusers import DDIMScheduler

    from sd_distill.conditioning import add_guidance_conditioning, guidance_projection, student_timestep_cond
    from sd_distill.lora import (
        DEFAULT_TARGET_MODULES,
        TIME_EMBEDDING_TARGET_MODULES,
        adapter_disabled,
        attach_lora,
    )
    from sd_distill.models import Components
    from sd_distill.train.config import TrainConfig
    from sd_distill.train.recipe import build_objective
    from sd_distill.train.step import distill_step
    from sd_distill.train.trajectories import walk

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="VARIANT", help="Time these variants alone (more rounds fit)."
    )
    parser.add_argument(
        "--flops", action="store_true", help="Also count each variant's FLOPs once (matmuls, convolutions, attention)."
    )
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    lat = args.resolution // 8
    uncond = torch.randn(1, 77, 1024, generator=g)
    cached = {
        "latents": torch.randn(1, 4, lat, lat, generator=g),
        "text_embeddings": torch.randn(1, 77, 1024, generator=g),
    }
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    counter = {"n": 0}

    def student(targets: tuple[str, ...]) -> tuple[Any, Any, Any, list[torch.nn.Parameter]]:
        """A UNet with ``cond_proj`` and a rank-4 LoRA on ``targets``, its teacher (the adapter off) and
        the step that trains it."""
        unet = build_unet()
        add_guidance_conditioning(unet, 256)
        params = attach_lora(unet, 4, target_modules=targets)
        projection = guidance_projection(unet)
        projection.requires_grad_(True)
        optimizer = torch.optim.AdamW([*params, projection.weight], lr=1e-5)

        @contextlib.contextmanager
        def teacher() -> Any:
            with adapter_disabled(unet):
                yield unet

        def step(objective: dict[str, Any], batch: dict[str, Any]) -> float:
            import time

            counter["n"] += 1
            gen = torch.Generator().manual_seed(counter["n"])
            start = time.perf_counter()
            per_sample, _ = distill_step(
                batch, unet, teacher, objective["source"], objective["target"], objective["loss"], gen
            )
            per_sample.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

        return unet, teacher, step, params

    unet, teacher, step, params = student(DEFAULT_TARGET_MODULES)
    # the CLI's default for a range: the LoRA also reaches the time embedding, where w enters
    unet_te, _, step_te, params_te = student((*DEFAULT_TARGET_MODULES, *TIME_EMBEDDING_TARGET_MODULES))
    projection = guidance_projection(unet)
    components = Components(None, None, None, unet, scheduler)
    fixed = build_objective(TrainConfig(), components, uncond, torch.float32)
    ranged = build_objective(TrainConfig(guidance_scale_range=[1.5, 10.0]), components, uncond, torch.float32)
    components_te = Components(None, None, None, unet_te, scheduler)
    ranged_te = build_objective(TrainConfig(guidance_scale_range=[1.5, 10.0]), components_te, uncond, torch.float32)
    from sd_distill.train.states import StoredStates

    stored = StoredStates(cached["text_embeddings"], torch.float32)
    buffered_batch = {
        "states": torch.randn(1, 4, lat, lat, generator=g),
        "targets": torch.randn(1, 4, lat, lat, generator=g),
        "t": torch.tensor([500]),
        "w": torch.tensor([7.5]),
        "prompt": torch.tensor([0]),
    }
    buffered = {**fixed, "source": stored}

    x = torch.randn(1, 4, lat, lat, generator=g)

    @torch.no_grad()
    def forward(with_w: bool) -> float:
        import time

        extra = {"timestep_cond": student_timestep_cond(torch.tensor([7.5]), 256, x)} if with_w else {}
        start = time.perf_counter()
        unet(x, torch.tensor([500]), encoder_hidden_states=cached["text_embeddings"], **extra)
        return time.perf_counter() - start

    def walk_state() -> float:
        import time

        start = time.perf_counter()
        walk(components, teacher, cached["text_embeddings"], uncond, torch.tensor([7.5]), [0], 2, (4, lat, lat))
        return (time.perf_counter() - start) / 2

    variants = {
        "fixed_w": lambda: step(fixed, cached),
        "w_conditioned": lambda: step(ranged, cached),
        "w_conditioned_time_embedding": lambda: step_te(ranged_te, cached),
        "buffered": lambda: step(buffered, buffered_batch),
        "forward_fixed": lambda: forward(False),
        "forward_w": lambda: forward(True),
        "walk_state": walk_state,
    }
    if args.only:
        unknown = sorted(set(args.only) - set(variants))
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.only}
    samples: dict[str, list[float]] = {}
    median = interleave(variants, args.rounds, args.warmup, samples)
    flops = count_flops(variants) if args.flops else {}
    pairs = {
        "w_conditioned/fixed_w": ("w_conditioned", "fixed_w"),
        "w_conditioned_time_embedding/fixed_w": ("w_conditioned_time_embedding", "fixed_w"),
        "buffered/fixed_w": ("buffered", "fixed_w"),
        "forward_w/forward_fixed": ("forward_w", "forward_fixed"),
    }
    spec_bytes = 2 * 2 * 4 * lat * lat + 20
    result = {
        "resolution": args.resolution,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "median_s": median,
        "samples_s": samples,
        "ratios": {k: median[a] / median[b] for k, (a, b) in pairs.items() if a in median and b in median},
        # per round, so that a slow round (a busy machine) moves both sides of a ratio
        "round_ratios": {
            k: [x / y for x, y in zip(samples[a], samples[b])]
            for k, (a, b) in pairs.items()
            if a in samples and b in samples
        },
        "cond_proj_params": projection.weight.numel(),
        "lora_params": sum(p.numel() for p in params),
        "lora_params_time_embedding": sum(p.numel() for p in params_te),
        "buffer_bytes_per_state": spec_bytes,
        "walk_s_per_state": median.get("walk_state"),
        "spread_s": {k: statistics.pstdev(v) for k, v in samples.items()},
        "flops": flops,
        "flop_ratios": {k: flops[a] / flops[b] for k, (a, b) in pairs.items() if a in flops and b in flops},
    }
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


def count_flops(variants: dict[str, Any]) -> dict[str, int]:
    """Each variant's FLOPs in one call, as torch's counter sees them: matrix products, convolutions and
    attention, not element-wise work. Noise-free where the CPU's timings scatter by a few percent."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for name, run in variants.items():
        with FlopCounterMode(display=False) as counter:
            run()
        counts[name] = counter.get_total_flops()
    return counts


if __name__ == "__main__":
    main()
