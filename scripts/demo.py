"""The embedded demo (``make demo``): distill the shipped toy teacher on the CPU and show it worked.

1. write the synthetic captioned image set (deterministic),
2. distill with ``bash mytrainbash.sh`` on ``accelerate_configs/cpu_demo.yaml`` -> outputs/demo/lora,
3. render held-out prompts with ``inf_txt2img_loop.py`` (base with CFG | distilled | base without
   CFG) -> outputs/demo/compare,
4. print caption adherence, seconds per image and the speed ratio of each column.

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
from sd_distill.lora import RESNET_AND_ATTENTION_TARGET_MODULES  # noqa: E402

TOY_TEACHER = ROOT / "models" / "toy-sd"
GUIDANCE_SCALE = 7.5
# Tuned on 2 CPU cores so that steps 2-4 finish in a few minutes.
TRAIN_ROWS = 1024
TRAIN_STEPS = 500  # 300 steps: distilled adherence 0.67 against the guided 0.92; 500: 0.83 (>= 0.9x)
BATCH_SIZE = 16
LEARNING_RATE = 1e-3
LORA_RANK = 16
# The toy UNet also takes the caption through every ResNet (its pooled caption joins the time
# embedding), so the adapter must reach the ResNets too, not only the attention projections (the
# default, where SD's UNet takes the caption). Measured on an intermediate teacher, 300 steps: with
# attention-only LoRA the student stayed at the unguided teacher (adherence 0.42, guided 0.92).
LORA_TARGETS = RESNET_AND_ATTENTION_TARGET_MODULES
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
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **threads, **(env or {})})


def main(argv: list[str] | None = None) -> int:
    from sd_distill.toy.synthetic import held_out_prompts, write_imagefolder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "demo"), help="Output folder.")
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS, help="Distillation steps.")
    parser.add_argument("--num_prompts", type=int, default=NUM_PROMPTS, help="Held-out prompts to render.")
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

    data = write_imagefolder(out / "data", n=TRAIN_ROWS, seed=0)
    # Every third held-out combination: the list is sorted by size and colour, so its head is all small red/green.
    prompts = held_out_prompts()[:: max(1, len(held_out_prompts()) // args.num_prompts)][: args.num_prompts]
    (out / "prompts.txt").write_text(
        "# held-out attribute combinations (not in the training captions)\n" + "\n".join(prompts) + "\n"
    )

    env = {
        "MODEL_NAME": str(teacher),
        "OUTPUT_DIR": str(out / "lora"),
        "DATASET_NAME": str(data),
        "ACCELERATE_CONFIG": str(ROOT / "accelerate_configs" / "cpu_demo.yaml"),
        "RESOLUTION": "32",
        "TRAIN_BATCH_SIZE": str(BATCH_SIZE),
        "LEARNING_RATE": str(LEARNING_RATE),
        "GUIDANCE_SCALE": str(GUIDANCE_SCALE),
        "DEFAULT_PROMPT": prompts[0],
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    _run(
        [
            "bash",
            str(ROOT / "mytrainbash.sh"),
            "--max_train_steps",
            str(args.steps),
            "--lora_rank",
            str(LORA_RANK),
            "--cache_latents",
            "--cache_text_embeddings",
            "--center_crop",
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
    """The lines a user reads at the end of the demo."""
    adherence = report.get("adherence") or {}
    fidelity = report["fidelity"]
    lines = [
        "",
        "=" * 72,
        f"grid: {out / 'compare' / report['grid']}",
        "",
        f"{'column':<16}{'guidance':>9}{'adherence':>11}{'s/image':>10}{'UNet passes/img':>17}",
    ]
    for c in report["columns"]:
        score = adherence.get(c["key"])
        lines.append(
            f"{c['title']:<16}{c['guidance_scale']:>9g}{'' if score is None else f'{score:.2f}':>11}"
            f"{c['seconds_per_image_median']:>10.3f}{c['unet_evals_per_image']:>17g}"
        )
    ratio = 1.0 / report["speed_ratio_distilled_over_base"]
    lines += [
        "",
        f"distilled / base-with-CFG seconds per image: {ratio:.2f}",
        f"MSE to base-with-CFG images: distilled {fidelity['distilled_vs_base_cfg']['mse']:.4f}"
        + (
            f", base without CFG {fidelity['base_nocfg_vs_base_cfg']['mse']:.4f}"
            if "base_nocfg_vs_base_cfg" in fidelity
            else ""
        ),
        f"demo took {seconds / 60:.1f} min",
        "=" * 72,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
