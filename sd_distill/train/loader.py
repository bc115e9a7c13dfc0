"""What the DataLoader iterates: torch datasets over a table's rows, the epoch-seeded sampler, the
collate function, and the budget of unreadable rows a run tolerates.

Unreadable rows never crash a run: a stream skips them as it goes, a map-style set (whose rows were
readable when it was scanned) serves the next readable row in place of one whose file vanished,
and both count them. More than ``--max_bad_fraction`` of the last :data:`BAD_ROW_WINDOW` rows
read is a :class:`BadDataError`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from .config import ConfigError
from .rows import DataSpec

BAD_ROW_WINDOW = 1000  # rows over which --max_bad_fraction is judged while training


class BadDataError(ConfigError):
    """Too much of the data cannot be read. It may be raised in a DataLoader worker, which re-raises
    it in the main process with the worker's whole traceback as the message: keep the last line."""

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


class BadRowWindow:
    """Unreadable rows among the last ``size`` rows read. More than ``max_fraction`` of a full window,
    or at :meth:`check` of all rows read so far, is a :class:`BadDataError`."""

    def __init__(self, max_fraction: float, size: int = BAD_ROW_WINDOW, hint: str = "") -> None:
        self.max_fraction, self.size, self.hint = max_fraction, max(1, size), hint
        self.chunks: deque[tuple[int, int]] = deque()
        self.rows = self.bad = 0

    def add(self, rows: int, bad: int) -> None:
        """``rows`` more rows read, ``bad`` of them unreadable."""
        self.chunks.append((rows, bad))
        self.rows, self.bad = self.rows + rows, self.bad + bad
        while self.rows - self.chunks[0][0] >= self.size:
            old_rows, old_bad = self.chunks.popleft()
            self.rows, self.bad = self.rows - old_rows, self.bad - old_bad
        if self.rows >= self.size:
            self.check()

    def check(self) -> None:
        if self.rows and self.bad > self.max_fraction * self.rows:
            raise BadDataError(
                f"{self.bad} of the last {self.rows} rows read cannot be decoded ({self.bad / self.rows:.0%}), "
                f"more than --max_bad_fraction {self.max_fraction}{self.hint}; check --image_column and the files."
            )


def epoch_and_index(key: Any, default_epoch: int) -> tuple[int, int]:
    """The sampler hands out ``(epoch, i)`` (the epoch must reach persistent workers, which keep their
    own copy of the dataset); a plain ``i`` is read at ``default_epoch``."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (default_epoch, int(key))


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Map-style view over the readable rows of a table. Augmentation draws from a generator
    seeded by ``(seed, epoch, row)``, so a resumed run sees exactly the same crops and flips."""

    def __init__(self, table: Any, rows: list[int], spec: DataSpec) -> None:
        self.table, self.rows, self.spec, self.epoch = table, rows, spec, 0

    def __len__(self) -> int:
        return len(self.rows)

    def select_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, key: Any) -> dict[str, Any]:
        epoch, i = epoch_and_index(key, self.epoch)
        # Readable when the set was scanned; a file deleted or changed since is counted and the
        # next readable row served instead (deterministic, so a resumed run serves the same).
        for tried in range(len(self.rows)):
            position = (i + tried) % len(self.rows)
            row_index = self.rows[position]
            example = self.spec.example(self.table[row_index], row_index, epoch)
            if example is not None:
                return {**example, "index": position, "bad_rows_before": tried}
        raise BadDataError("no image of the dataset can be read any more (were the files deleted during the run?).")

    def caption(self, i: int) -> str:
        return self.spec.caption(self.table[self.rows[i]])


class StreamingImageCaptionDataset(torch.utils.data.IterableDataset):
    """Iterable view over a streamed table that skips (and counts) unreadable rows as it goes, and
    stops when more than ``max_bad_fraction`` of the last rows read were unreadable. Every rank reads
    the whole stream (accelerate hands each its share of the batches), so all ranks stop together."""

    def __init__(self, table: Any, spec: DataSpec, max_bad_fraction: float = 1.0) -> None:
        self.table, self.spec, self.epoch, self.max_bad_fraction = table, spec, 0, max_bad_fraction

    def select_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        window = BadRowWindow(self.max_bad_fraction)
        bad = 0
        for i, row in enumerate(self.table):
            example = self.spec.example(row, i, self.epoch)
            window.add(1, int(example is None))
            if example is None:
                bad += 1
                continue
            yield {**example, "index": i, "bad_rows_before": bad}
            bad = 0
        window.check()  # a pass shorter than a window is judged over all its rows


class EpochShuffleSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """A permutation drawn from ``(seed, epoch)``: the same order when a run is resumed. Hands out
    ``(epoch, i)`` so that the epoch reaches the dataset in every worker."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def select_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter([(self.epoch, i) for i in torch.randperm(self.size, generator=g).tolist()])


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    # A tensor comes first: accelerate reads the batch size from the first entry.
    batch: dict[str, Any] = {"index": torch.tensor([e["index"] for e in examples])}
    for key in ("pixel_values", "latents", "text_embeddings"):
        if key in examples[0]:
            batch[key] = torch.stack([e[key] for e in examples])
    batch["caption"] = [e["caption"] for e in examples]
    batch["bad_rows"] = sum(e.get("bad_rows_before", 0) for e in examples)
    return batch
