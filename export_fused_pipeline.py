#!/usr/bin/env python
"""Export a finished training folder as a full pipeline with the LoRA fused into the UNet, which stock
diffusers loads alone (the same export as training's ``--export_fused_pipeline``):

    python export_fused_pipeline.py --student sd-distill-v21 --out sd-distill-v21-fused [--dtype fp16]
"""

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from sd_distill.conditioning import StudentFolderError
    from sd_distill.files import OutputWriteError
    from sd_distill.train.export_cli import ExportError, how_to_load, resolve, run

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        export = resolve(argv)
        run(export)
    except (ExportError, StudentFolderError, OutputWriteError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {export.out}; load it with {how_to_load(export)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
