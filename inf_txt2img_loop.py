"""Base (CFG) vs distilled side by side: parse -> sd_distill.eval.compare.run(config) -> short summary.

python inf_txt2img_loop.py --ft_model ./sd-distill-v21 --out_dir compare_out
accelerate launch --num_processes 2 inf_txt2img_loop.py --ft_model ./sd-distill-v21   # prompts split
"""

from __future__ import annotations

import logging
import os
import sys

from sd_distill.eval.compare import CompareError, parse_args, run
from sd_distill.processes import close_process_group, exit_process, report_native_crashes


def main(argv: list[str] | None = None) -> int:
    report_native_crashes()
    try:
        return _compare(argv)
    finally:
        close_process_group()  # else a finished comparison under accelerate launch may abort at exit


def _compare(argv: list[str] | None) -> int:
    main_rank = os.environ.get("RANK", "0") == "0"  # other ranks log warnings only
    logging.basicConfig(
        level=logging.INFO if main_rank else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    config = parse_args(argv)
    try:
        report = run(config)
    except CompareError as exc:  # user input problems: one line, no traceback
        if main_rank:  # every rank fails alike; say it once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if main_rank:
        print(f"grid: {os.path.join(config.out_dir, report['grid'])}")
        for c in report["columns"]:
            title = f"{c['title']} (w={c['guidance_scale']:g})"
            print(
                f"{title:>28}: {c['seconds_per_image_median']:.4f} s/image, "
                f"{c['unet_evals_per_image']:g} UNet evals/image"
            )
        print(
            f"speed ratio at g={report['speed_ratio_guidance_scale']:g} (base / distilled time): "
            f"{report['speed_ratio_distilled_over_base']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    exit_process(main())
