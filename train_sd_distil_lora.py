#!/usr/bin/env python
"""Distill classifier-free guidance of a Stable Diffusion UNet into a LoRA adapter.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml train_sd_distil_lora.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \\
        --dataset_name ./diffusiondb-2m_first_10k --output_dir sd-distill-v21

Also runs under plain ``python``. ``--help`` lists every flag.
"""

import math
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from sd_distill.processes import close_process_group, report_native_crashes

    report_native_crashes()
    try:
        return _train(argv)
    finally:
        close_process_group()  # every exit, not only end_training's: else a rank may abort at exit


def _train(argv: list[str] | None) -> int:
    from sd_distill.files import OutputWriteError
    from sd_distill.train import ConfigError, RunComplete, TrainingError, parse_args, run

    main_rank = os.environ.get("RANK", "0") == "0"  # every rank ends alike; say it once
    try:
        config = parse_args(argv)
        stats = run(config)
    except RunComplete as done:
        if main_rank:
            print(done)
        return 0
    except (ConfigError, TrainingError, OutputWriteError) as err:
        if _speaks():  # every rank fails alike; say it once per machine
            print(f"error: {err}", file=sys.stderr)
        return 2
    if stats.interrupted:
        if main_rank:
            print(f"interrupted at step {stats.global_step}; checkpoint saved in {config.output_dir}")
        return 130
    if main_rank:
        loss = f"final loss {stats.final_loss:.4g}" if math.isfinite(stats.final_loss) else "final loss not measured"
        print(f"done: {stats.global_step} steps, {loss}, LoRA in {config.output_dir}")
    return 0


def _speaks() -> bool:
    """The first process of each machine (LOCAL_RANK 0): a machine's log then says why it stopped."""
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"


if __name__ == "__main__":
    from sd_distill.processes import exit_process

    exit_process(main())
