"""The GPU check, one GPU, about 8 minutes: run it once when a GPU machine is lent and put the
table into BENCHMARKS.md with the GPU model. It prints one table and writes ``gpu_check.json``.

    bash benchmarks/gpu_check.sh [OUT_DIR]

1. the tiny pipeline trained in fp16 and in bf16 with validation mid-run and partial caching
   (text cached, latents not: the VAE must still be on the GPU after validation);
2. the SD-2.1-base architecture with random weights, 512 px, cached latents and text, ZeRO-2 in one
   process and plain accelerate: samples/s and peak GPU memory of training steps;
3. 25-step 512 px images, base with CFG against the distilled LoRA (fused), fp16: s/image and ratio.
Every figure comes from the project's own entry points (train_sd_distil_lora.py, inf_txt2img_loop.py).
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

ZERO2_1PROC = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config: {zero_stage: 2, offload_optimizer_device: none, offload_param_device: none, zero3_init_flag: false}
num_machines: 1
num_processes: 1
machine_rank: 0
mixed_precision: fp16
use_cpu: false
"""


def _launch(config: Path, script: str, args: list[str], log: Path, timeout: int = 420) -> tuple[bool, float]:
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate)] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*launcher, "launch", "--config_file", str(config), "--main_process_port", "0", str(ROOT / script), *args]
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    return proc.returncode == 0, time.perf_counter() - start


def _train_args(model: Path, data: Path, out: Path, resolution: int, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--resolution",
        str(resolution),
        "--report_to",
        "none",
        "--seed",
        "0",
        *extra,
    ]


def tiny_precisions(work: Path) -> dict[str, bool]:
    """Defect 1 of issue 13: validation on one GPU with partial caching, fp16 and bf16."""
    from helpers import write_image_folder
    from sd_distill.toy.tiny import build_tiny_pipeline

    model = build_tiny_pipeline(work / "tiny")
    data = write_image_folder(work / "tiny-data", n=8)
    results = {}
    for precision in ("fp16", "bf16"):
        args = _train_args(
            model,
            data,
            work / f"tiny-{precision}",
            32,
            "--mixed_precision",
            precision,
            "--train_batch_size",
            "2",
            "--max_train_steps",
            "6",
            "--validation_steps",
            "2",
            "--num_validation_inference_steps",
            "2",
            "--default_prompt",
            "a red circle",
            "--cache_text_embeddings",
            "--no-cache_latents",
            "--checkpointing_steps",
            "3",
        )
        ok, _ = _launch(
            ROOT / "accelerate_configs" / "single_gpu.yaml",
            "train_sd_distil_lora.py",
            args,
            work / f"tiny-{precision}.log",
        )
        results[precision] = ok
    return results


def sd21_folder(work: Path) -> Path:
    """The SD-2.1-base architecture with random weights, saved as a pipeline folder (fp16)."""
    import torch

    from benchmarks.sd21 import build_parts, build_pipeline

    folder = work / "sd21-random"
    if not (folder / "model_index.json").exists():
        pipe = build_pipeline(build_parts("sd21"))
        pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def sd21_training(work: Path, model: Path, steps: int, batch: int) -> dict[str, dict]:
    from helpers import write_image_folder

    data = write_image_folder(work / "sd21-data", n=64, size=(512, 512))
    (work / "zero2_1proc.yaml").write_text(ZERO2_1PROC)
    out: dict[str, dict] = {}
    for name, config in (
        ("zero2_1proc", work / "zero2_1proc.yaml"),
        ("plain", ROOT / "accelerate_configs" / "single_gpu.yaml"),
    ):
        run = work / f"sd21-{name}"
        args = _train_args(
            model,
            data,
            run,
            512,
            "--mixed_precision",
            "fp16",
            "--train_batch_size",
            str(batch),
            "--max_train_steps",
            str(steps),
            "--checkpointing_steps",
            str(steps),
            "--allow_tf32",
            "--default_prompt",
            "",
            "--cache_latents",
            "--cache_text_embeddings",
        )
        ok, seconds = _launch(config, "train_sd_distil_lora.py", args, work / f"sd21-{name}.log")
        summary = json.loads((run / "train_summary.json").read_text()) if ok else {}
        out[name] = {
            "ok": ok,
            "wall_s": seconds,
            "samples_per_s": summary.get("steps_per_second", 0) * batch,
            "peak_gpu_memory_gb": summary.get("peak_gpu_memory_gb"),
            "lora": str(run),
        }
    return out


def sd21_inference(work: Path, model: Path, lora: Path) -> dict:
    prompts = ["a photo of a cat", "a castle on a hill at sunset", "a bowl of fruit", "a red bicycle"]
    args = [
        "--ft_model",
        str(lora),
        "--b_model",
        str(model),
        "--out_dir",
        str(work / "sd21-compare"),
        "--num_inference_steps",
        "25",
        "--dtype",
        "fp16",
        "--prompts",
        *prompts,
    ]
    ok, _ = _launch(
        ROOT / "accelerate_configs" / "single_gpu.yaml", "inf_txt2img_loop.py", args, work / "sd21-compare.log"
    )
    if not ok:
        return {"ok": False}
    report = json.loads((work / "sd21-compare" / "report.json").read_text())
    cols = {c["key"]: c for c in report["columns"]}
    return {
        "ok": True,
        "base_cfg_s": cols["base_cfg"]["seconds_per_image_median"],
        "distilled_s": cols["distilled"]["seconds_per_image_median"],
        "distilled_over_base": cols["distilled"]["seconds_per_image_median"]
        / cols["base_cfg"]["seconds_per_image_median"],
    }


def main(argv: list[str] | None = None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="outputs/gpu_check")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    result["tiny_validation_partial_cache"] = tiny_precisions(work)
    model = sd21_folder(work)
    result["sd21_train_512"] = sd21_training(work, model, args.steps, args.batch)
    result["sd21_infer_512_25_steps"] = sd21_inference(work, model, Path(result["sd21_train_512"]["plain"]["lora"]))
    (work / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    return result


def table(r: dict) -> str:
    t, i = r["sd21_train_512"], r["sd21_infer_512_25_steps"]
    rows = [f"GPU: {r['gpu']} (torch {r['torch']})", "| check | result |", "|---|---|"]
    rows += [
        f"| tiny, {k}, validation + partial caching | {'ok' if v else 'FAILED'} |"
        for k, v in r["tiny_validation_partial_cache"].items()
    ]
    for name, v in t.items():
        mem = v["peak_gpu_memory_gb"]
        rows.append(
            f"| SD-2.1 arch 512 px train, {name} | {v['samples_per_s']:.1f} samples/s, peak "
            f"{'n/a' if mem is None else f'{mem:.1f} GB'} {'' if v['ok'] else '(FAILED)'} |"
        )
    if i.get("ok"):
        rows.append(
            f"| SD-2.1 arch 512 px, 25 steps, fp16 | base CFG {i['base_cfg_s']:.2f} s/img, distilled "
            f"{i['distilled_s']:.2f} s/img, ratio {i['distilled_over_base']:.2f} |"
        )
    else:
        rows.append("| SD-2.1 arch inference | FAILED |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
