"""The training loop: micro-steps, the decisions every rank takes together, and what happens at
each optimizer step (logging, checkpoints, validation)."""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import save_checkpoint
from .epochs import epoch_batches
from .loader import BAD_ROW_WINDOW, BadRowWindow
from .step import distill_step, step_generator
from .validation import run_validation

if TYPE_CHECKING:
    from .recipe import Training

logger = logging.getLogger(__name__)
NUM_LOSS_BUCKETS = 4  # loss is also logged per quarter of the timestep range
VANISHED = " (files deleted or changed during the run?)"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss keeps being non-finite); the message says why."""


@dataclass
class Stats:
    """What a run measured; returned by :func:`train_loop` and written to ``train_summary.json``."""

    global_step: int = 0
    final_loss: float = float("nan")
    skipped_nonfinite: int = 0
    skipped_rows: int = 0  # unreadable rows: found by the scan, then met while training (all ranks)
    empty_captions: int = 0  # rows trained on the empty prompt because their caption was unusable
    steps_per_second: float = 0.0
    seconds: float = 0.0
    interrupted: bool = False
    losses: list[float] = field(default_factory=list)


@dataclass
class Agreement:
    """What every rank decides alike about one micro-step (from one all-reduce)."""

    nonfinite: bool  # some rank's loss is NaN/inf: nobody updates
    stop: bool  # some rank was asked to stop: all checkpoint and stop
    mean_loss: float  # the loss averaged over ranks
    rows: int = 0  # rows read for this micro-batch on all ranks, unreadable ones included
    bad_rows: int = 0  # of them unreadable (skipped): every rank counts, and judges, the same


def agree(accelerator: Any, loss: torch.Tensor, stop_requested: bool, batch: dict[str, Any]) -> Agreement:
    bad = float(batch.get("bad_rows", 0))
    rows = float(len(batch["caption"])) + bad
    flags = torch.tensor(
        [float(not torch.isfinite(loss)), float(stop_requested), loss.detach().float().item(), rows, bad],
        device=accelerator.device,
    )
    flags = accelerator.reduce(flags, reduction="sum")
    return Agreement(
        bool(flags[0] > 0),
        bool(flags[1] > 0),
        flags[2].item() / accelerator.num_processes,
        int(flags[3].item()),
        int(flags[4].item()),
    )


class LossWindow:
    """Losses since the last optimizer step, overall and per quarter of the timestep range."""

    def __init__(self, num_train_timesteps: int) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.sums, self.counts = torch.zeros(NUM_LOSS_BUCKETS), torch.zeros(NUM_LOSS_BUCKETS)
        self.losses: list[float] = []

    def add(self, per_sample: torch.Tensor, t: torch.Tensor, mean_loss: float) -> None:
        buckets = (t * NUM_LOSS_BUCKETS // self.num_train_timesteps).clamp(max=NUM_LOSS_BUCKETS - 1)
        self.sums.index_add_(0, buckets, per_sample)
        self.counts.index_add_(0, buckets, torch.ones_like(per_sample))
        self.losses.append(mean_loss)

    def bucket_logs(self) -> dict[str, float]:
        return {
            f"loss_t{i}": (self.sums[i] / self.counts[i]).item() for i in range(NUM_LOSS_BUCKETS) if self.counts[i] > 0
        }

    def clear(self) -> None:
        self.sums.zero_(), self.counts.zero_(), self.losses.clear()


class InterruptFlag:
    """With ``--save_on_interrupt``, SIGTERM/SIGINT ask the loop to checkpoint and stop."""

    def __init__(self, enabled: bool) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread (e.g. called from a notebook worker)
                    pass

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class _Progress:
    """The loop's running state."""

    stats: Stats
    window: LossWindow
    stop: InterruptFlag
    bar: Any
    bad_rows: BadRowWindow | None = None  # see _vanished_rows_window
    consecutive_nonfinite: int = 0
    last_log_time: float = field(default_factory=time.perf_counter)


def train_loop(tr: Training) -> Stats:
    """Optimizer steps from ``tr.start_step`` to the schedule's end (or an interrupt); every rank calls it."""
    from tqdm.auto import tqdm

    config, schedule = tr.config, tr.schedule
    stats = Stats(global_step=tr.start_step)
    if tr.data.scan is not None:
        stats.skipped_rows, stats.empty_captions = tr.data.scan.bad_images, tr.data.scan.bad_captions
    bar = tqdm(
        total=schedule.max_steps,
        initial=tr.start_step,
        desc="distilling",
        disable=not tr.accelerator.is_local_main_process,
    )
    run = _Progress(
        stats,
        LossWindow(tr.components.noise_scheduler.config.num_train_timesteps),
        InterruptFlag(config.save_on_interrupt),
        bar,
        _vanished_rows_window(tr),
    )
    start_time = time.perf_counter()
    tr.student.train()
    batches = epoch_batches(tr.accelerator, tr.dataloader, (tr.sampler, tr.dataset), schedule, tr.start_step)
    try:
        while stats.global_step < schedule.max_steps and not run.stop.requested:
            micro_step, batch = next(batches)
            _micro_step(tr, run, batch, micro_step)
            if not tr.accelerator.sync_gradients:
                continue
            stats.global_step += 1
            _after_update(tr, run)
    finally:  # an error message then starts on a line of its own, not after the progress bar
        batches.close()
        bar.close()
    stats.seconds = time.perf_counter() - start_time
    stats.steps_per_second = (stats.global_step - tr.start_step) / stats.seconds if stats.seconds > 0 else 0.0
    stats.interrupted = run.stop.requested
    run.stop.restore()
    return stats


def _vanished_rows_window(tr: Training) -> BadRowWindow | None:
    """Map-style sets were scanned, so their unreadable rows are files that vanished since; a stream
    judges its rows itself as they go by (every rank reads all of them)."""
    if tr.sampler is None:
        return None
    return BadRowWindow(tr.config.max_bad_fraction, min(BAD_ROW_WINDOW, len(tr.sampler)), VANISHED)


def _micro_step(tr: Training, run: _Progress, batch: dict[str, Any], micro_step: int) -> None:
    acc = tr.accelerator
    with acc.accumulate(tr.student):
        gen = step_generator(tr.seed, micro_step, acc.process_index, acc.device)
        per_sample, t = distill_step(batch, tr.student, tr.teacher, tr.source, tr.target, tr.loss, gen)
        loss = per_sample.mean()
        agreed = agree(acc, loss, run.stop.requested, batch)
        run.stats.skipped_rows += agreed.bad_rows
        if run.bad_rows is not None:
            run.bad_rows.add(agreed.rows, agreed.bad_rows)
        if agreed.nonfinite:
            _skip_nonfinite(tr, run)
        else:
            run.consecutive_nonfinite = 0
            acc.backward(loss)
            if acc.sync_gradients and not tr.is_deepspeed:  # DeepSpeed clips inside its own step
                acc.clip_grad_norm_(tr.lora_params, tr.config.max_grad_norm)
            tr.optimizer.step()
            tr.lr_scheduler.step()
            tr.optimizer.zero_grad(set_to_none=True)
            run.window.add(per_sample.detach().float().cpu(), t.cpu(), agreed.mean_loss)
        if agreed.stop:
            run.stop.requested = True


def _skip_nonfinite(tr: Training, run: _Progress) -> None:
    run.stats.skipped_nonfinite += 1
    run.consecutive_nonfinite += 1
    logger.warning("non-finite loss at step %d; skipping this batch (no update)", run.stats.global_step)
    if run.consecutive_nonfinite >= tr.config.max_consecutive_nonfinite:
        raise TrainingError(
            f"the loss was non-finite (NaN/inf) for {run.consecutive_nonfinite} steps in a row. With fp16 this is "
            "usually overflow: try --mixed_precision bf16 (or no), a lower --learning_rate, or --max_grad_norm 1.0."
        )
    tr.optimizer.zero_grad(set_to_none=True)


def _after_update(tr: Training, run: _Progress) -> None:
    """Log the optimizer step just taken; checkpoint and validate when due."""
    stats, config, step = run.stats, tr.config, run.stats.global_step
    run.bar.update(1)
    if run.window.losses:
        stats.final_loss = sum(run.window.losses) / len(run.window.losses)
        stats.losses.append(stats.final_loss)
    now = time.perf_counter()
    logs = {
        "loss": stats.final_loss,
        "lr": tr.lr_scheduler.get_last_lr()[0],
        "step_time": now - run.last_log_time,
        **run.window.bucket_logs(),
    }
    run.last_log_time = now
    run.window.clear()
    tr.accelerator.log(logs, step=step)
    run.bar.set_postfix(loss=f"{stats.final_loss:.4g}")
    if step % config.checkpointing_steps == 0 or run.stop.requested:
        save_checkpoint(tr.accelerator, tr.model, config, step, protect=tr.resume_from)
    if config.prompts_for_validation and step % config.validation_steps == 0:
        run_validation(tr.accelerator, tr.model, tr.separate_teacher, tr.components, config, step, tr.weight_dtype)
