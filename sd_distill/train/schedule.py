"""Step arithmetic of a run: how many optimizer steps, and where a resumed run picks up.

A *micro-step* is one batch on every rank; ``accumulation`` of them make an optimizer step. Map-style
data has epochs of ``batches_per_epoch`` micro-steps; a stream (``batches_per_epoch is None``) has none.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    max_steps: int  # optimizer steps of the whole run
    accumulation: int  # micro-batches per optimizer step
    batches_per_epoch: int | None  # micro-batches per epoch on each rank; None for a stream

    @classmethod
    def plan(
        cls,
        *,
        rows: int | None,
        batch_size: int,
        num_processes: int,
        accumulation: int,
        max_train_steps: int | None,
        num_train_epochs: int,
    ) -> Schedule:
        """The schedule for ``rows`` readable rows (``None``: a stream, which needs ``max_train_steps``)."""
        batches = None if rows is None else math.ceil(rows / (batch_size * num_processes))
        # accelerate ends an accumulation window at the end of an epoch too, hence the ceil
        updates = None if batches is None else math.ceil(batches / accumulation)
        max_steps = max_train_steps or num_train_epochs * (updates or 1)
        return cls(max_steps=max_steps, accumulation=accumulation, batches_per_epoch=batches)

    @property
    def updates_per_epoch(self) -> int | None:
        return None if self.batches_per_epoch is None else math.ceil(self.batches_per_epoch / self.accumulation)

    def with_epoch_length(self, batches: int) -> Schedule:
        """A stream's schedule once it has been read through: a pass is an epoch of ``batches``."""
        return dataclasses.replace(self, batches_per_epoch=batches)

    def resume_point(self, global_step: int) -> tuple[int, int]:
        """``(epoch, batches to skip in it)`` where a run that has made ``global_step`` updates goes on.
        For a stream of unknown length that is in its first pass; if the stream turns out shorter,
        place the point again with :meth:`with_epoch_length`."""
        updates = self.updates_per_epoch
        if not updates:
            return 0, global_step * self.accumulation
        epoch = global_step // updates
        return epoch, (global_step - epoch * updates) * self.accumulation

    def micro_step(self, epoch: int, batches_done: int) -> int:
        """The micro-batch counter an uninterrupted run has reached after ``batches_done`` batches of
        ``epoch`` (it seeds each micro-batch's noise, so a resumed run draws the same). A stream is
        in epoch 0 until its length is known."""
        return epoch * (self.batches_per_epoch or 0) + batches_done


def decay_steps(max_steps: int, fraction: float) -> int:
    """Steps of the final decay of a warm-up/stable/decay schedule: the last ``fraction`` of the run,
    rounded up, at least one and at most all (the product is rounded to 9 places first, so 0.07 of
    100 steps is 7, not 8)."""
    return max(1, min(max_steps, math.ceil(round(max_steps * fraction, 9))))
