"""Where along sampling a student departs from the guided teacher (toy teacher by default, CPU).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.step_errors --scale 4 --out outputs/step_errors.json \
        STUDENT_DIR [STUDENT_DIR ...]

For each trained student folder, the demo's 12 held-out prompts × 4 seeds (the initial noises of
``benchmarks.state_sources``) are walked by the pipeline's scheduler twice, 20 steps:

- ``off``: along the teacher's own guided trajectory at ``g``, the states a student trained on teacher
  trajectories has seen;
- ``on``: along the student's own one-pass trajectory, where it really goes when it samples;

and at every step the mean squared error of the student's prediction to the teacher's guided prediction
at that state. ``on`` over ``off`` at a step is what drift costs there; one student over another at the
same step says where one fits worse. A w-conditioned student is told ``g``; a fixed-w one is asked as is.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sd_distill.conditioning import student_timestep_cond
from sd_distill.guidance import teacher_cfg_prediction

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "toy-sd"
# (x_in [K, C, h, w], t) -> a prediction [K, C, h, w]
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided(unet: Any, cond: torch.Tensor, uncond: torch.Tensor, g: float) -> Predict:
    """The teacher's CFG prediction at ``g`` (its ``[∅; c]`` pass), for a batch of prompts ``cond``."""
    return lambda x, t: teacher_cfg_prediction(unet, x, t.expand(len(x)), cond, uncond, g)


def one_pass(unet: Any, cond: torch.Tensor, g: float) -> Predict:
    """The student's single pass, told ``g`` when it is w-conditioned (as stock pipelines tell it)."""
    dim = unet.config.time_cond_proj_dim

    @torch.no_grad()
    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        extra = {} if dim is None else {"timestep_cond": student_timestep_cond(g, dim, x)}
        return unet(x, t.expand(len(x)), encoder_hidden_states=cond, return_dict=False, **extra)[0].float()

    return predict


@torch.no_grad()
def visited_states(drive: Predict, scheduler: Any, noise: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(t, scaled model input)`` at every step of the deterministic walk that ``drive`` steers from ``noise``."""
    x, states = noise * scheduler.init_noise_sigma, []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        states.append((t, x_in))
        x = scheduler.step(drive(x_in, t), t, x, eta=0.0, return_dict=False)[0]
    return states


def step_errors(teacher: Predict, student: Predict, scheduler: Any, noise: torch.Tensor) -> dict[str, list[float]]:
    """Per-step MSE of ``student`` to ``teacher`` on the teacher's walk (``off``) and on the student's (``on``)."""

    def errors(drive: Predict) -> list[float]:
        return [
            float((student(x, t) - teacher(x, t)).pow(2).mean()) for t, x in visited_states(drive, scheduler, noise)
        ]

    return {"off": errors(teacher), "on": errors(student)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.torch_utils import randn_tensor

    from sd_distill.conditioning import load_student
    from sd_distill.toy.synthetic import held_out_prompts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("students", nargs="+", help="trained student folders (the CLI's --output_dir)")
    p.add_argument("--scale", type=float, default=7.5, help="guidance scale g of the teacher (and the student)")
    p.add_argument("--teacher", default=str(TEACHER))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", help="write the per-step errors here as JSON")
    args = p.parse_args(argv)

    def pipe_of(folder: str | None) -> Any:
        pipe = StableDiffusionPipeline.from_pretrained(args.teacher)
        pipe.set_progress_bar_config(disable=True)
        return pipe if folder is None else load_student(pipe, folder)

    held = held_out_prompts()
    prompts = held[:: max(1, len(held) // 12)][:12]  # the demo's held-out prompts
    base = pipe_of(None)
    cond, uncond = base.encode_prompt(prompts, "cpu", 1, True)
    scheduler = type(base.scheduler).from_config(base.scheduler.config)
    scheduler.set_timesteps(args.steps)
    size = base.unet.config.sample_size
    shape = (base.unet.config.in_channels, size, size)
    teacher = guided(base.unet, cond, uncond[:1], args.scale)
    result: dict[str, Any] = {"scale": args.scale, "timesteps": scheduler.timesteps.tolist(), "students": {}}
    for folder in args.students:
        student = one_pass(pipe_of(folder).unet, cond, args.scale)
        per_seed = []
        for seed in args.seeds:
            gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(prompts))]
            per_seed.append(
                step_errors(teacher, student, scheduler, randn_tensor((len(prompts), *shape), generator=gens))
            )
        mean = {k: [sum(s[k][i] for s in per_seed) / len(per_seed) for i in range(args.steps)] for k in ("off", "on")}
        result["students"][folder] = mean
        for kind, values in mean.items():
            print(f"{Path(folder).name:>40} {kind:>3} " + " ".join(f"{v:.3f}" for v in values))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
