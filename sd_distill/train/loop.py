"""The training loop: micro-steps without host syncs, and what happens after an optimizer step
(agreement and logging every ``--logging_steps``, checkpoints, validation)."""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .agreement import StepWindow, agree
from .checkpoint import save_checkpoint
from .epochs import epoch_batches
from .loader import BAD_ROW_WINDOW, BadRowWindow
from .step import distill_step, step_generator
from .validation import run_validation

if TYPE_CHECKING:
    from .recipe import Training

logger = logging.getLogger(__name__)
VANISHED = " (files deleted or changed during the run?)"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss keeps being non-finite); the message says why."""


@dataclass
class Stats:
    """What a run measured; returned by :func:`train_loop` and written to ``train_summary.json``. A
    resumed run measures only what it ran: its losses, seconds and speed cover the steps after
    ``first_step`` (the checkpoint's step; 0 for a fresh run)."""

    global_step: int = 0
    first_step: int = 0
    final_loss: float = float("nan")
    skipped_nonfinite: int = 0
    skipped_rows: int = 0  # rows whose image could not be decoded
    empty_captions: int = 0  # rows trained on the empty prompt because their caption was unusable
    steps_per_second: float = 0.0
    seconds: float = 0.0
    interrupted: bool = False
    peak_gpu_memory_gb: float | None = None  # torch.cuda.max_memory_allocated on this rank's GPU
    losses: list[float] = field(default_factory=list)  # the agreed loss of each logging window


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
    window: StepWindow
    stop: InterruptFlag
    bar: Any
    bad_rows: BadRowWindow | None = None  # map-style: files that vanish mid-run (a stream judges itself)
    last_log_time: float = field(default_factory=time.perf_counter)


def train_loop(tr: Training) -> Stats:
    """Optimizer steps from ``tr.start_step`` to the schedule's end (or an interrupt); every rank calls it."""
    from tqdm.auto import tqdm

    config, schedule = tr.config, tr.schedule
    stats = Stats(global_step=tr.start_step, first_step=tr.start_step)
    if tr.data.scan is not None:
        stats.skipped_rows, stats.empty_captions = tr.data.scan.bad_images, tr.data.scan.bad_captions
    bar = tqdm(
        total=schedule.max_steps,
        initial=tr.start_step,
        desc="distilling",
        disable=not tr.accelerator.is_local_main_process,
    )
    window = StepWindow(tr.components.noise_scheduler.config.num_train_timesteps, tr.accelerator.device)
    vanished = (
        None
        if tr.sampler is None
        else BadRowWindow(config.max_bad_fraction, min(BAD_ROW_WINDOW, len(tr.sampler)), VANISHED)
    )
    run = _Progress(stats, window, InterruptFlag(config.save_on_interrupt), bar, vanished)
    start_time = time.perf_counter()
    tr.student.train()
    batches = epoch_batches(tr.accelerator, tr.dataloader, (tr.sampler, tr.dataset), schedule, tr.start_step)
    try:
        while stats.global_step < schedule.max_steps and not stats.interrupted:
            micro_step, batch = next(batches)
            _micro_step(tr, run, batch, micro_step)
            if not tr.accelerator.sync_gradients:
                continue
            stats.global_step += 1
            bar.update(1)
            _after_update(tr, run)
    finally:  # an error message then starts on a line of its own, not after the progress bar
        batches.close()
        bar.close()
    stats.seconds = time.perf_counter() - start_time
    stats.steps_per_second = (stats.global_step - stats.first_step) / stats.seconds if stats.seconds > 0 else 0.0
    if tr.accelerator.device.type == "cuda":
        stats.peak_gpu_memory_gb = torch.cuda.max_memory_allocated(tr.accelerator.device) / 1e9
    run.stop.restore()
    return stats


def _micro_step(tr: Training, run: _Progress, batch: dict[str, Any], micro_step: int) -> None:
    """Forward, backward and (at the end of an accumulation window) the update, with no host sync.

    A non-finite loss is not tested on the host before the backward: its NaN gradients make the
    update skip on the device (fused AdamW's ``found_inf``, or GradScaler / DeepSpeed, which skip
    non-finite gradients themselves), and the window counts it for the next agreement.
    """
    acc = tr.accelerator
    with acc.accumulate(tr.student):
        gen = step_generator(tr.seed, micro_step, acc.process_index, acc.device)
        per_sample, t = distill_step(batch, tr.student, tr.teacher, tr.source, tr.target, tr.loss, gen)
        run.window.add(per_sample, t)
        run.window.count_rows(batch)
        acc.backward(per_sample.mean())
        if acc.sync_gradients:
            run.window.end_update(_guard_update(tr, run.window.step_bad))
        tr.optimizer.step()
        tr.lr_scheduler.step()
        tr.optimizer.zero_grad(set_to_none=True)


def _guard_update(tr: Training, loss_bad: torch.Tensor) -> torch.Tensor:
    """Clip, and mark the coming update for skipping when anything was non-finite; returns the
    device flag of a skipped update."""
    if tr.is_deepspeed:  # DeepSpeed clips and skips non-finite gradients inside its own step
        return loss_bad
    max_norm = tr.config.max_grad_norm or float("inf")  # 0: no clipping, but the norm is still checked
    norm = tr.accelerator.clip_grad_norm_(tr.trainable_params, max_norm)
    bad = loss_bad | ~torch.isfinite(torch.as_tensor(norm, device=loss_bad.device))
    if tr.accelerator.scaler is None:  # GradScaler (fp16) sets found_inf itself
        tr.optimizer.optimizer.found_inf = bad.float()  # fused AdamW skips the update on the device
    return bad


def _after_update(tr: Training, run: _Progress) -> None:
    """After an optimizer step: agree, log, checkpoint and validate when due."""
    stats, config, step = run.stats, tr.config, run.stats.global_step
    if tr.average is not None:
        tr.average.update(step)  # before a checkpoint, which then holds this step in the mean
    after_update = getattr(tr.source, "after_update", None)  # e.g. the student's pool, renewed when due
    if after_update is not None and step < tr.schedule.max_steps:
        after_update(step)  # before a checkpoint, which then holds what the next step trains on
    checkpoint_due = step % config.checkpointing_steps == 0
    if step % config.logging_steps == 0 or checkpoint_due or step >= tr.schedule.max_steps:
        _agree_and_log(tr, run)
    if checkpoint_due or stats.interrupted:
        save_checkpoint(tr.accelerator, tr.model, config, step, protect=tr.resume_from)
    if config.prompts_for_validation and step % config.validation_steps == 0:
        run_validation(tr.accelerator, tr.model, tr.separate_teacher, tr.components, config, step, tr.weight_dtype)


def _agree_and_log(tr: Training, run: _Progress) -> None:
    """The agreement point: every rank learns the same loss, skips and stop request."""
    stats, step, steps = run.stats, run.stats.global_step, run.window.steps
    agreed = agree(tr.accelerator, run.window, run.stop.requested)
    stats.skipped_nonfinite, stats.interrupted = agreed.skipped, agreed.stop
    stats.skipped_rows += agreed.bad_rows  # unreadable rows on every rank, judged alike by all
    if run.bad_rows is not None:
        run.bad_rows.add(agreed.rows, agreed.bad_rows)
    if agreed.consecutive >= tr.config.max_consecutive_nonfinite:
        raise TrainingError(
            f"the loss was non-finite (NaN/inf) for at least {tr.config.max_consecutive_nonfinite} steps in a row "
            f"(up to step {step}). With fp16 this is usually overflow: try --mixed_precision bf16 (or no), "
            "a lower --learning_rate, or a smaller --max_grad_norm."
        )
    if agreed.skipped:
        logger.warning("%d update(s) skipped so far: non-finite loss or gradients", agreed.skipped)
    if agreed.loss == agreed.loss:  # not NaN: some micro-batch since the last agreement was finite
        stats.final_loss = agreed.loss
        stats.losses.append(agreed.loss)
    now = time.perf_counter()
    logs = {
        "loss": agreed.loss,
        "lr": tr.lr_scheduler.get_last_lr()[0],
        "step_time": (now - run.last_log_time) / max(1, steps),
        **agreed.bucket_losses,
    }
    run.last_log_time = now
    tr.accelerator.log(logs, step=step)
    run.bar.set_postfix(loss=f"{stats.final_loss:.4g}")
