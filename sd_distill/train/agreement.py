"""What the ranks count on the device between agreement points, and the one collective that turns
it into decisions every rank takes alike (log this loss, stop now, give up on a diverged run).

Nothing here reads a GPU value on the host during a step: losses, per-timestep buckets and the
non-finite flags stay device tensors until :func:`agree`, which runs every ``--logging_steps``
optimizer steps and at checkpoints, so the GPU queue never drains inside a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

NUM_LOSS_BUCKETS = 4  # loss is also logged per quarter of the timestep range


class StepWindow:
    """Device-side sums since the last agreement."""

    def __init__(self, num_train_timesteps: int, device: torch.device) -> None:
        self.num_train_timesteps, self.device = num_train_timesteps, device
        zeros = torch.zeros(2 * NUM_LOSS_BUCKETS + 2, device=device)
        self.sums = zeros  # [bucket sums (4), bucket counts (4), loss sum, finite micro-batches]
        self.step_bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss in this update
        self.skipped = torch.zeros((), device=device)  # updates skipped since the start of the run
        self.consecutive = torch.zeros((), device=device)  # skipped updates in a row
        self.steps = 0  # optimizer steps since the last agreement (host counter)
        self.rows = self.bad_rows = 0  # rows read / of them unreadable since the last agreement (host)

    def add(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        """One micro-batch: ``per_sample`` losses ``[B]`` at timesteps ``t`` ``[B]``; non-finite ones are
        left out of the sums and mark the update as bad."""
        per_sample = per_sample.detach().float()
        finite = torch.isfinite(per_sample).all()
        self.step_bad |= ~finite
        clean = torch.where(finite, per_sample, torch.zeros_like(per_sample))
        buckets = (t * NUM_LOSS_BUCKETS // self.num_train_timesteps).clamp(max=NUM_LOSS_BUCKETS - 1)
        self.sums[:NUM_LOSS_BUCKETS].index_add_(0, buckets, clean)
        self.sums[NUM_LOSS_BUCKETS : 2 * NUM_LOSS_BUCKETS].index_add_(0, buckets, finite.float().expand_as(clean))
        self.sums[-2] += clean.mean()
        self.sums[-1] += finite.float()

    def count_rows(self, batch: dict[str, Any]) -> None:
        """Rows this batch read, unreadable ones (skipped by the dataset) included: host ints, no sync."""
        bad = int(batch.get("bad_rows", 0))
        self.bad_rows += bad
        self.rows += len(batch.get("caption", batch.get("t", ()))) + bad

    def end_update(self, bad: torch.Tensor) -> None:
        """An optimizer step ended; ``bad`` (device bool) says it was skipped as non-finite."""
        self.skipped += bad.float()
        self.consecutive = (self.consecutive + 1) * bad.float()
        self.step_bad = torch.zeros_like(self.step_bad)
        self.steps += 1


@dataclass
class Agreement:
    """What every rank decided alike at an agreement point."""

    loss: float  # mean loss of the finite micro-batches since the last agreement, over all ranks
    bucket_losses: dict[str, float]
    skipped: int  # updates skipped as non-finite so far
    consecutive: int  # of them in a row, up to now
    stop: bool  # some rank was asked to stop
    rows: int  # rows read on all ranks since the last agreement, unreadable ones included
    bad_rows: int  # of them unreadable (skipped)


def agree(accelerator: Any, window: StepWindow, stop_requested: bool) -> Agreement:
    """One small all-gather (the only host read of device values in the loop); resets the window."""
    host = torch.tensor([float(stop_requested), window.rows, window.bad_rows], device=window.device)
    local = torch.cat([window.sums, torch.stack([window.skipped, window.consecutive]), host]).unsqueeze(0)
    everyone = accelerator.gather(local) if accelerator.num_processes > 1 else local  # [ranks, k]
    n_sums = window.sums.numel()
    sums = everyone[:, :n_sums].sum(0).tolist()
    skipped, consecutive, stop = everyone[:, n_sums : n_sums + 3].max(0).values.tolist()
    rows, bad_rows = everyone[:, n_sums + 3 :].sum(0).tolist()
    n = NUM_LOSS_BUCKETS
    buckets = {f"loss_t{i}": sums[i] / sums[n + i] for i in range(n) if sums[n + i] > 0}
    window.sums.zero_()
    window.steps = window.rows = window.bad_rows = 0
    return Agreement(
        loss=sums[-2] / sums[-1] if sums[-1] > 0 else float("nan"),
        bucket_losses=buckets,
        skipped=int(skipped),
        consecutive=int(consecutive),
        stop=stop > 0,
        rows=int(rows),
        bad_rows=int(bad_rows),
    )
