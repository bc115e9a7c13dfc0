"""The training recipe: ``setup`` -> ``train_loop`` -> ``finish`` (see :mod:`.recipe`).

Where things are: the run's flags (``config``), the step arithmetic (``schedule``), data and its
cache (``rows``, ``data``, ``cache``), the two seams of an objective (``states``: where the states
come from; ``targets``: what the student learns there), one micro-step (``step``), the loop
(``loop``), checkpoints (``checkpoint``), validation images (``validation``), the accelerator
(``distributed``) and what a run leaves behind (``outputs``).
"""

from .config import ConfigError, TrainConfig, parse_args
from .loop import Stats, TrainingError, train_loop
from .recipe import Training, finish, run, setup
from .resume import RunComplete

__all__ = [
    "ConfigError",
    "RunComplete",
    "Stats",
    "TrainConfig",
    "Training",
    "TrainingError",
    "finish",
    "parse_args",
    "run",
    "setup",
    "train_loop",
]
