"""The loader's batches from where a run starts, epoch after epoch, each with its micro-step number.

A resumed run skips what the interrupted one consumed. A map-style set skips by sampler position
(nothing decoded); a stream can only be read through, so it skips by reading, and when the skip runs
off the end of the first pass, the stream's length is known and the resume point is placed again
(``Schedule.with_epoch_length``): an uninterrupted run learns the length at the same moment, so both
number their micro-steps alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .loader import BadDataError
from .schedule import Schedule

_END = object()


def epoch_batches(
    accelerator: Any, dataloader: Any, holders: Iterable[Any], schedule: Schedule, start_step: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(micro_step, batch)`` forever from the state after ``start_step`` updates; ``holders`` (the
    sampler, the dataset) are told each epoch. A whole pass without a batch is a BadDataError."""
    stream = schedule.batches_per_epoch is None
    epoch, skip = schedule.resume_point(start_step)
    while True:
        for holder in holders:
            # Not named set_epoch: accelerate's loader calls set_epoch(times iterated), which
            # differs from the epoch after a resume (the resumed epoch runs in a skipping loader).
            if hasattr(holder, "select_epoch"):
                holder.select_epoch(epoch)
        if stream:
            batches, seen = _read_past(dataloader, skip)
        else:
            batches, seen = (accelerator.skip_first_batches(dataloader, skip) if skip else dataloader), skip
        trained = 0
        for batch in batches:
            seen, trained = seen + 1, trained + 1
            yield schedule.micro_step(epoch, seen), batch
        if seen == 0:  # every rank reads the same rows, so every rank stops here
            raise BadDataError(
                "a whole pass over the data gave no batch: it has no rows, or none whose image can be decoded; "
                "check --image_column and the files."
            )
        if schedule.batches_per_epoch is None:  # a stream, read through for the first time
            schedule = schedule.with_epoch_length(seen)
            if not trained:  # the run resumed beyond this pass
                epoch, skip = schedule.resume_point(start_step)
                continue
        epoch, skip = epoch + 1, 0


def _read_past(dataloader: Any, count: int) -> tuple[Iterator[Any], int]:
    """An iterator of ``dataloader`` past its first ``count`` batches, and how many it read past
    (fewer when the pass ended first)."""
    batches = iter(dataloader)
    for done in range(count):
        if next(batches, _END) is _END:
            return iter(()), done
    return batches, count
