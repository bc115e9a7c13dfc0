#!/usr/bin/env python
"""Train the shipped toy teacher (models/toy-sd): a thin CLI over ``sd_distill.toy.teacher``, whose
docstring gives the two commands that made the shipped model. ``--help`` lists every flag."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from sd_distill.toy.teacher import main  # noqa: E402

if __name__ == "__main__":
    main()
