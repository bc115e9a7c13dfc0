"""Training-loop step rate of two checkouts side by side, and ZeRO-2 against ZeRO-3 (CPU, tiny model).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.loop_overhead --baseline ../sd-distill-old --rounds 3

Each variant is a real ``accelerate launch`` of ``train_sd_distil_lora.py`` on the same data and
flags; the figure is ``steps_per_second`` from its ``train_summary.json`` (the loop alone: model
loading and caching are not in it). Variants run in rotating order each round, and the ratios are
medians of per-round ratios, so a drifting machine load hits every variant alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(
    repo: Path, accelerate_config: str, model: Path, data: Path, out: Path, steps: int, extra: list[str]
) -> float:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate),
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / accelerate_config),
        "--main_process_port",
        "0",
        str(repo / "train_sd_distil_lora.py"),
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--resolution",
        "32",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        str(steps),
        "--report_to",
        "none",
        "--default_prompt",
        "",
        "--seed",
        "0",
        "--overwrite_output_dir",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{repo} {accelerate_config} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "train_summary.json").read_text())["steps_per_second"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, help="another checkout (e.g. a git worktree of an older commit)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--width", type=int, default=4, help="UNet width multiplier of the tiny pipeline")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import write_image_folder
    from sd_distill.toy.tiny import build_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="loop-bench-"))
    model = build_tiny_pipeline(work / "model", width=args.width)
    data = write_image_folder(work / "data", n=64)
    variants = {
        "current, 1 process": (ROOT, "cpu_demo.yaml", []),
        "current, 2 processes ZeRO-2": (ROOT, "cpu_2proc_zero2.yaml", []),
        "current, 2 processes ZeRO-3": (ROOT, "cpu_2proc_zero3.yaml", []),
    }
    if args.baseline:
        variants["baseline, 1 process"] = (args.baseline.resolve(), "cpu_demo.yaml", [])
        variants["baseline, 2 processes ZeRO-2"] = (args.baseline.resolve(), "cpu_2proc_zero2.yaml", [])
    names = list(variants)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            repo, config, extra = variants[name]
            rates[name].append(_train(repo, config, model, data, work / name.replace(" ", "_"), args.steps, extra))
    result = {"steps_per_second": rates, "median": {n: statistics.median(v) for n, v in rates.items()}}

    def ratio(a: str, b: str) -> float:  # median of per-round ratios of step time a / b
        return statistics.median(rb / ra for ra, rb in zip(rates[a], rates[b]))

    pairs = [("current, 2 processes ZeRO-3", "current, 2 processes ZeRO-2")]
    if args.baseline:
        pairs += [
            ("current, 1 process", "baseline, 1 process"),
            ("current, 2 processes ZeRO-2", "baseline, 2 processes ZeRO-2"),
        ]
    result["step_time_ratios"] = {f"{a} / {b}": ratio(a, b) for a, b in pairs}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
