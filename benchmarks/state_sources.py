"""Quality of students by state source and guidance scale, on the shipped toy teacher (CPU).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.state_sources --out outputs/state_sources \
        --variants images:7.5 teacher_trajectories:7.5 --train_seeds 0 1 2 --jobs 2

Each variant ``SOURCE:W`` (or ``SOURCE:LOW-HIGH`` for one w-conditioned LoRA, ``SOURCE:W@STEPS`` for
another step count) is trained with the real CLI (the demo's settings: 1,024-row synthetic set or its
captions, batch 16, rank 16 on ResNets + attention, and the time embedding for a range, lr 1e-3, 500
steps), then every student, the teacher with CFG and the teacher without it render the 12 held-out
prompts of the demo with 4 seeds each (20 DDIM steps, one generator per image).
Per eval scale g: caption adherence (toy checker) and MSE to the
teacher-CFG(g) images; the mean and the spread (population std) over the training seeds, each run's
figure being the mean over its 48 images. Wall-clock of every training (buffer generation included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sd_distill.lora import TIME_EMBEDDING_TARGET_MODULES

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "toy-sd"
TARGETS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "to_q", "to_k", "to_v", "to_out.0"]
# A range student's LoRA also reaches the time embedding, where it is told w (the CLI's default for a range).
RANGE_TARGETS = [*TARGETS, *TIME_EMBEDDING_TARGET_MODULES]


def parse_variant(text: str) -> dict[str, Any]:
    source, _, rest = text.partition(":")
    scale, _, steps = rest.partition("@")
    low, _, high = scale.partition("-")
    return {
        "name": text,
        "source": source,
        "range": (float(low), float(high)) if high else None,
        "w": float(low),
        "steps": int(steps) if steps else None,
    }


def train(variant: dict[str, Any], seed: int, args: argparse.Namespace, data: Path) -> dict[str, Any]:
    out = Path(args.out) / "runs" / f"{variant['name'].replace(':', '_')}-seed{seed}"
    steps = variant["steps"] or args.steps
    cmd = [
        sys.executable, str(ROOT / "train_sd_distil_lora.py"),
        "--pretrained_model_name_or_path", str(TEACHER), "--train_data_dir", str(data),
        "--output_dir", str(out), "--overwrite_output_dir", "--resolution", "32",
        "--train_batch_size", "16", "--learning_rate", "1e-3", "--lora_rank", "16",
        "--lora_target_modules", *(RANGE_TARGETS if variant["range"] else TARGETS),
        "--max_train_steps", str(steps), "--seed", str(seed),
        "--checkpointing_steps", str(steps), "--report_to", "none", "--default_prompt", "",
        "--cache_dir", str(out / "cache"), "--train_states", variant["source"],
        "--trajectory_steps", str(args.trajectory_steps),
    ]  # fmt: skip
    if variant["range"]:
        cmd += ["--guidance_scale_range", *map(str, variant["range"]), "--guidance_scale", "7.5"]
    else:
        cmd += ["--guidance_scale", str(variant["w"])]
    if variant["source"] == "images":
        cmd += ["--center_crop"]
    cmd += args.extra
    start = time.perf_counter()
    log = out.parent / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    return {"variant": variant["name"], "seed": seed, "dir": str(out), "wall_s": time.perf_counter() - start}


def eval_prompts() -> list[str]:
    """The demo's 12 held-out prompts (attribute combinations absent from the training captions)."""
    from sd_distill.toy.synthetic import held_out_prompts

    held = held_out_prompts()
    return held[:: max(1, len(held) // 12)][:12]


def image_seeds(seed: int, prompts: int) -> list[int]:
    """The noise seed of each prompt's image under eval seed ``seed``: one generator per image."""
    return [seed * 1000 + i for i in range(prompts)]


def load_pipe(teacher: str | Path, student: str | Path | None = None) -> Any:
    """The teacher pipeline, with a trained student folder loaded into it when given."""
    from diffusers import StableDiffusionPipeline

    from sd_distill.conditioning import load_student

    pipe = StableDiffusionPipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    return pipe if student is None else load_student(pipe, student)


def render(pipe: Any, prompts: list[str], seeds: list[int], g: float) -> np.ndarray:
    """``[S * P, H, W, 3]`` in [0, 1]: one generator per image, seeded from (seed, prompt)."""
    out = []
    for seed in seeds:
        gens = [torch.Generator().manual_seed(s) for s in image_seeds(seed, len(prompts))]
        result = pipe(prompt=prompts, guidance_scale=g, num_inference_steps=20, generator=gens, output_type="np")
        out.append(result.images)
    return np.concatenate(out)


def evaluate(runs: list[dict[str, Any]], variants: dict[str, dict], args: argparse.Namespace) -> dict[str, Any]:
    from sd_distill.toy.checker import adherence

    prompts = eval_prompts()
    captions = prompts * len(args.eval_seeds)
    scales = sorted(set(args.eval_scales))

    def score(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        per_image = ((images - reference) ** 2).reshape(len(images), -1).mean(1)
        return {
            "adherence": adherence(list(images), captions).score,
            "mse": float(per_image.mean()),
            # a few images that take another layout dominate the mean; the median shows the rest
            "mse_median": float(np.median(per_image)),
        }

    teacher = load_pipe(TEACHER)
    result: dict[str, Any] = {"prompts": prompts, "eval_seeds": args.eval_seeds, "per_scale": {}}
    for g in scales:
        reference = render(teacher, prompts, args.eval_seeds, g)
        rows = {"teacher_cfg": score(reference, reference), "teacher_nocfg": score(
            render(teacher, prompts, args.eval_seeds, 1.0), reference)}  # fmt: skip
        for run in runs:
            v = variants[run["variant"]]
            if v["range"] is None and v["w"] != g:
                continue  # a fixed-w student is scored at its own scale only
            student = load_pipe(TEACHER, run["dir"])
            # a w-conditioned student is told g (one pass, stock pipeline); a fixed-w one samples at 1
            rows[f"{run['variant']}#{run['seed']}"] = score(
                render(student, prompts, args.eval_seeds, g if v["range"] else 1.0), reference
            )
        result["per_scale"][str(g)] = rows
    return result


def summarise(result: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    lines = []
    wall: dict[str, list[float]] = {}
    for r in runs:
        wall.setdefault(r["variant"], []).append(r["wall_s"])
    for g, rows in result["per_scale"].items():
        lines += [
            f"\n### g = {g}\n",
            "| model | runs | adherence (mean ± sd) | MSE to teacher-CFG (mean ± sd) | median image MSE (mean ± sd) |",
            "|---|---|---|---|---|",
        ]
        groups: dict[str, list[dict[str, float]]] = {}
        for key, value in rows.items():
            groups.setdefault(key.split("#")[0], []).append(value)
        for name, values in groups.items():
            a = [v["adherence"] for v in values]
            m = [v["mse"] for v in values]
            med = [v.get("mse_median", float("nan")) for v in values]
            sd = lambda x: statistics.pstdev(x) if len(x) > 1 else 0.0  # noqa: E731
            lines.append(
                f"| {name} | {len(values)} | {statistics.mean(a):.3f} ± {sd(a):.3f} | "
                f"{statistics.mean(m):.4f} ± {sd(m):.4f} | {statistics.mean(med):.4f} ± {sd(med):.4f} |"
            )
    lines += ["\n| variant | training wall-clock s (mean, buffer included) |", "|---|---|"]
    lines += [f"| {k} | {statistics.mean(v):.0f} |" for k, v in wall.items()]
    return "\n".join(lines)


def main() -> None:
    from sd_distill.toy.synthetic import write_imagefolder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/state_sources")
    parser.add_argument("--variants", nargs="+", default=["images:7.5", "teacher_trajectories:7.5"])
    parser.add_argument("--train_seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval_seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--eval_scales", type=float, nargs="+", default=[7.5])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--trajectory_steps", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--eval_only", action="store_true", help="Score the runs already in --out.")
    parser.add_argument("--train_only", action="store_true", help="Train what is missing; score nothing.")
    parser.add_argument("extra", nargs="*", help="Extra training flags, after --.")
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not (data / "metadata.jsonl").is_file():
        write_imagefolder(data, n=1024, seed=0)
    variants = {v["name"]: v for v in map(parse_variant, args.variants)}
    runs_file = out / "runs.json"
    known = json.loads(runs_file.read_text()) if runs_file.is_file() else []
    todo = [(v, s) for v in variants.values() for s in args.train_seeds
            if not any(r["variant"] == v["name"] and r["seed"] == s for r in known)]  # fmt: skip
    if not args.eval_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            for run in pool.map(lambda vs: train(vs[0], vs[1], args, data), todo):
                known.append(run)
                runs_file.write_text(json.dumps(known, indent=2))
    if args.train_only:
        return
    runs = [r for r in known if r["variant"] in variants and r["seed"] in args.train_seeds]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = evaluate(runs, variants, args)
    result["runs"] = runs
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    table = summarise(result, runs)
    (out / "quality.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
