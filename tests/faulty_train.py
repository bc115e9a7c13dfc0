"""The training CLI with one rank's writes failing as on a full disk: a fault injector for tests.

``SD_FAULT_RANK`` (the ``RANK`` whose writes fail) and ``SD_FAULT_FILE`` (a part of the file name):
every ``torch.save`` of a matching path on that rank raises ENOSPC, as a disk that fills while the
ranks write their checkpoint shards does (``SD_FAULT_KIND=other``: a RuntimeError, an error that is
not about the disk). Launched with ``accelerate launch`` in place of the CLI.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _fail_matching_saves(part: str, kind: str) -> None:
    real = torch.save

    def save(obj, f, *args, **kwargs):  # type: ignore[no-untyped-def]
        if part in str(f):
            if kind == "other":
                raise RuntimeError(f"injected failure saving {f}")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *args, **kwargs)

    torch.save = save


if __name__ == "__main__":
    if os.environ.get("RANK", "0") == os.environ["SD_FAULT_RANK"]:
        _fail_matching_saves(os.environ["SD_FAULT_FILE"], os.environ.get("SD_FAULT_KIND", "enospc"))
    sys.path.insert(0, str(ROOT))
    from sd_distill.processes import exit_process
    from train_sd_distil_lora import main

    exit_process(main())
