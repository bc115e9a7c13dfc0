#!/usr/bin/env python
"""Distill classifier-free guidance of a Stable Diffusion UNet into a LoRA adapter.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml train_sd_distil_lora.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-2-1-base \\
        --dataset_name ./diffusiondb-2m_first_10k --output_dir sd-distill-v21

Also runs under plain ``python``. ``--help`` lists every flag.
"""

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from sd_distill.train import ConfigError, TrainingError, parse_args, run

    main_rank = os.environ.get("RANK", "0") == "0"  # every rank ends alike; say it once
    try:
        config = parse_args(argv)
        stats = run(config)
    except (ConfigError, TrainingError) as err:
        if main_rank:
            print(f"error: {err}", file=sys.stderr)
        return 2
    if stats.interrupted:
        if main_rank:
            print(f"interrupted at step {stats.global_step}; checkpoint saved in {config.output_dir}")
        return 130
    if main_rank:
        print(f"done: {stats.global_step} steps, final loss {stats.final_loss:.4g}, LoRA in {config.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
