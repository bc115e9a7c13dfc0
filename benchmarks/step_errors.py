"""Where along sampling a student departs from the guided teacher (toy teacher by default, CPU).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.step_errors --scale 4 --out outputs/step_errors.json \
        STUDENT_DIR [STUDENT_DIR ...]

For each trained student folder, the demo's 12 held-out prompts × 4 seeds (the initial noises of
``benchmarks.state_sources``) are walked twice by the walker that builds trajectory buffers
(``sd_distill.train.trajectories.walk``, DDIM, 20 steps):

- ``off``: along the teacher's own guided trajectory at ``g``, the states a student trained on teacher
  trajectories has seen;
- ``on``: along the student's own one-pass trajectory, where it really goes when it samples;

and at every step the mean squared error of the student's prediction to the teacher's guided prediction
at that state. ``on`` over ``off`` at a step is what drift costs there; one student over another at the
same step says where one fits worse. A w-conditioned student is told ``g``; a fixed-w one is asked as is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sd_distill.conditioning import student_timestep_cond
from sd_distill.models import Components
from sd_distill.train.on_policy import one_pass
from sd_distill.train.states import TrainingStates
from sd_distill.train.trajectories import StudentPredict, walk

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "toy-sd"


def stock_inputs(unet: Any) -> Callable[[TrainingStates], dict[str, Any]]:
    """What a stock pipeline tells this UNet besides the state: ``w`` when it is w-conditioned."""
    dim = unet.config.time_cond_proj_dim
    return lambda states: {} if dim is None else {"timestep_cond": student_timestep_cond(states.w, dim, states.x_t)}


def step_errors(
    components: Components,
    student: StudentPredict,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    g: float,
    seeds: list[int],
    steps: int,
) -> dict[str, list[float]]:
    """Per-step MSE of ``student`` to the guided teacher (``components.unet`` as it is) at ``g``, on the
    teacher's own walk (``off``) and on the student's (``on``): the buffer's walker, one trajectory per
    prompt of ``cond`` ``[K, L, D]`` from the noise of each of ``seeds``."""
    unet = components.unet
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    w = torch.full((len(seeds),), float(g))

    def errors(driver: StudentPredict | None) -> list[float]:
        out = walk(components, lambda: contextlib.nullcontext(unet), cond, uncond, w, seeds, steps, shape, driver)
        states, targets = (out[k].view(len(seeds), steps, *shape) for k in ("states", "targets"))
        t = out["t"].view(len(seeds), steps).long()
        return [
            float((student(states[:, i].to(cond.dtype), t[:, i], cond, w) - targets[:, i].float()).pow(2).mean())
            for i in range(steps)
        ]

    return {"off": errors(None), "on": errors(student)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from benchmarks.state_sources import eval_prompts, image_seeds, load_pipe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("students", nargs="+", help="trained student folders (the CLI's --output_dir)")
    p.add_argument("--scale", type=float, default=7.5, help="guidance scale g of the teacher (and the student)")
    p.add_argument("--teacher", default=str(TEACHER))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", help="write the per-step errors here as JSON")
    args = p.parse_args(argv)

    prompts = eval_prompts()
    base = load_pipe(args.teacher)
    cond, uncond = base.encode_prompt(prompts, "cpu", 1, True)
    components = Components(base.tokenizer, base.text_encoder, base.vae, base.unet, base.scheduler)
    result: dict[str, Any] = {"scale": args.scale, "steps": args.steps, "students": {}}
    for folder in args.students:
        unet = load_pipe(args.teacher, folder).unet
        student = one_pass(unet, stock_inputs(unet))
        # one walk per prompt and seed, from the noise the quality benchmark renders that image from
        per_seed = [
            step_errors(components, student, cond, uncond[:1], args.scale, image_seeds(s, len(prompts)), args.steps)
            for s in args.seeds
        ]
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
