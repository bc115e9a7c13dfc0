"""The embedded demo (``make demo``): distill the shipped toy teacher on the CPU and show it worked.

1. write the training prompts (captions of the synthetic shape set; with ``--states images`` the
   captioned images too),
2. distill one LoRA for every guidance scale in 1.5-10 with ``bash mytrainbash.sh`` on
   ``accelerate_configs/cpu_demo.yaml`` -> outputs/demo/lora. By default from the prompts alone, on
   the teacher's guided trajectories (no image is read, no teacher pass in a training step),
3. render held-out prompts with ``inf_txt2img_loop.py --guidance_scales 2 4 7.5 10`` (base with CFG
   at each scale | the student at each scale, one pass per step | base without CFG) -> outputs/demo/compare,
   with guidance_curve.png,
4. print caption adherence, MSE to the guided images and seconds per image at each scale.

The steps run as the user would run them (subprocesses of the real entry points), so the demo
also checks that those work on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
from sd_distill.lora import RESNET_AND_ATTENTION_TARGET_MODULES, TIME_EMBEDDING_TARGET_MODULES  # noqa: E402

TOY_TEACHER = ROOT / "models" / "toy-sd"
GUIDANCE_SCALE = 7.5  # the scale validation images and the model card show
GUIDANCE_RANGE = ("1.5", "10")  # one LoRA for all of these
# w uniform in log w: more of the range's low end, where one LoRA for all scales loses most (toy teacher,
# 3 seeds x 48 images: MSE at g = 2 0.0013 +- 0.0001 against 0.0027 +- 0.0012 with w uniform, 4 and 7.5 alike).
GUIDANCE_SAMPLING = "log"
EVAL_SCALES = ("2", "4", "7.5", "10")
TRAJECTORY_STEPS = 20  # DDIM steps of each teacher trajectory: 20 training states per prompt
# Tuned on 2 CPU cores so that steps 2-4 finish in a few minutes.
TRAIN_ROWS = 1024
TRAIN_STEPS = 500  # 300 steps: distilled adherence 0.67 against the guided 0.92; 500: 0.83 (>= 0.9x)
BATCH_SIZE = 16
LEARNING_RATE = 1e-3
LORA_RANK = 16
# The toy UNet also takes the caption through every ResNet (its pooled caption joins the time
# embedding), so the adapter must reach the ResNets too, not only the attention projections (the
# default, where SD's UNet takes the caption). Measured on an intermediate teacher, 300 steps: with
# attention-only LoRA the student stayed at the unguided teacher (adherence 0.42, guided 0.92). The time
# embedding too, as the training CLI's default for a range: it is where the student is told w.
LORA_TARGETS = RESNET_AND_ATTENTION_TARGET_MODULES + TIME_EMBEDDING_TARGET_MODULES
SAMPLING_STEPS = 20
NUM_PROMPTS = 12
# All prompts in one pipeline call. At batch 1 a UNet call of these toy models is ~80 % fixed
# per-call overhead (one thread: 25 ms at batch 1, 36 ms at batch 2; 86 ms at 12, 146 ms at 24), so halving
# the passes cannot halve the time; batched, the UNet's work dominates, as it does for SD-2.1 on a GPU.
RENDER_BATCH = NUM_PROMPTS


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    # One intra-op thread: the toy models are too small to gain from more, and on a busy 2-core
    # machine spinning OpenMP threads made a training step 25x slower (10 s instead of 0.4 s).
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    status = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **threads, **(env or {})}).returncode
    if status != 0:  # the step said why in its own `error:` line; no traceback of ours after it
        print(f"error: the demo stopped: {Path(cmd[1]).name} exited with status {status}", file=sys.stderr)
        raise SystemExit(status)


def main(argv: list[str] | None = None) -> int:
    from sd_distill.toy.synthetic import held_out_prompts, make_dataset, write_imagefolder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo"), help="Output folder.")
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS, help="Distillation steps.")
    parser.add_argument("--num_prompts", type=int, default=NUM_PROMPTS, help="Held-out prompts to render.")
    parser.add_argument(
        "--states",
        default="teacher_trajectories",
        choices=("teacher_trajectories", "student_trajectories", "images"),
        help="Training states: the teacher's guided trajectories from prompts alone (default), or noised images.",
    )
    parser.add_argument(
        "--teacher",
        default=str(TOY_TEACHER),
        help="Teacher pipeline folder (default: the shipped toy teacher; e.g. one you retrained).",
    )
    args = parser.parse_args(argv)
    teacher = Path(args.teacher)
    if not (teacher / "model_index.json").is_file():
        print(
            f"error: no diffusers pipeline (model_index.json) in {teacher}; the shipped toy teacher is "
            f"{TOY_TEACHER}, and scripts/train_toy_teacher.py rebuilds it",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    started = time.perf_counter()

    # Every third held-out combination: the list is sorted by size and colour, so its head is all small red/green.
    prompts = held_out_prompts()[:: max(1, len(held_out_prompts()) // args.num_prompts)][: args.num_prompts]
    (out / "prompts.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text(
        "# held-out attribute combinations (not in the training captions)\n" + "\n".join(prompts) + "\n"
    )
    env = {
        "MODEL_NAME": str(teacher),
        "OUTPUT_DIR": str(out / "lora"),
        "ACCELERATE_CONFIG": str(ROOT / "accelerate_configs" / "cpu_demo.yaml"),
        "RESOLUTION": "32",
        "TRAIN_BATCH_SIZE": str(BATCH_SIZE),
        "LEARNING_RATE": str(LEARNING_RATE),
        "GUIDANCE_SCALE": str(GUIDANCE_SCALE),
        "GUIDANCE_SCALE_RANGE": " ".join(GUIDANCE_RANGE),
        "TRAIN_STATES": args.states,
        "DEFAULT_PROMPT": prompts[0],
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if args.states == "images":
        env["DATASET_NAME"] = str(write_imagefolder(out / "data", n=TRAIN_ROWS, seed=0))
        state_flags = ["--cache_latents", "--cache_text_embeddings", "--center_crop"]
    else:  # the captions alone: no image is written or read
        _, captions = make_dataset(TRAIN_ROWS, seed=0)
        (out / "train_prompts.txt").write_text("\n".join(captions) + "\n")
        env["PROMPTS_FILE"] = str(out / "train_prompts.txt")
        state_flags = ["--trajectory_steps", str(TRAJECTORY_STEPS), "--trajectory_shard_size", "64"]
    _run(
        [
            "bash",
            str(ROOT / "mytrainbash.sh"),
            "--max_train_steps",
            str(args.steps),
            "--lora_rank",
            str(LORA_RANK),
            *state_flags,
            "--overwrite_output_dir",
            "--report_to",
            "none",
            "--checkpointing_steps",
            str(args.steps),
            "--validation_steps",
            str(args.steps),
            "--num_validation_inference_steps",
            str(SAMPLING_STEPS),
            "--cache_dir",
            str(out / "cache"),
            "--lora_target_modules",
            *LORA_TARGETS,
            "--guidance_scale_sampling",
            GUIDANCE_SAMPLING,
        ],
        env,
    )
    _run(
        [
            sys.executable,
            str(ROOT / "inf_txt2img_loop.py"),
            "--ft_model",
            str(out / "lora"),
            "--out_dir",
            str(out / "compare"),
            "--prompts_file",
            str(out / "prompts.txt"),
            "--also_base_without_cfg",
            "--guidance_scales",
            *EVAL_SCALES,
            "--num_inference_steps",
            str(SAMPLING_STEPS),
            "--seed",
            "0",
            "--batch_size",
            str(min(RENDER_BATCH, args.num_prompts)),
        ]
    )

    report = json.loads((out / "compare" / "report.json").read_text())
    print(summary(report, time.perf_counter() - started, out))
    return 0


def summary(report: dict, seconds: float, out: Path) -> str:
    """The lines a user reads at the end of the demo: per scale, the student against the base."""
    seconds_of = {c["key"]: c["seconds_per_image_median"] for c in report["columns"]}
    lines = [
        "",
        "=" * 78,
        f"grid: {out / 'compare' / report['grid']}",
        f"curve: {out / 'compare' / report['guidance_curve']}" if report.get("guidance_curve") else "",
        "",
        f"{'g':>5}  {'adherence: base CFG':>20}{'student':>9}{'no CFG':>8}   {'MSE to base CFG: student':>25}"
        f"{'no CFG':>8}   {'s/image base':>13}{'student':>9}",
    ]
    for section in report.get("per_scale", []):
        adh = section["adherence"] or {}
        fid = section["fidelity"]
        cols = section["columns"]

        def num(value: float | None, digits: int = 2) -> str:
            return "–" if value is None else f"{value:.{digits}f}"

        lines.append(
            f"{section['guidance_scale']:>5g}  {num(adh.get('base_cfg')):>20}{num(adh.get('distilled')):>9}"
            f"{num(adh.get('base_nocfg')):>8}   {num(fid['distilled_vs_base_cfg']['mse'], 4):>25}"
            f"{num(fid.get('base_nocfg_vs_base_cfg', {}).get('mse'), 4):>8}   "
            f"{seconds_of[cols['base_cfg']]:>13.3f}{seconds_of[cols['distilled']]:>9.3f}"
        )
    lines += [
        "",
        "one LoRA, one UNet pass per step at every scale (the base with CFG: two)",
        f"demo took {seconds / 60:.1f} min",
        "=" * 78,
    ]
    return "\n".join(line for line in lines if line is not None)


if __name__ == "__main__":
    sys.exit(main())
