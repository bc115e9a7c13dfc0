"""Everything a run checks before it reads data or loads a model: the flags, the launch, the output
folder (ours, writable, not in use, on a disk every rank sees), the export target and the checkpoint
to resume from. The main process decides what depends on the disk; every rank learns the answer, so
all of them stop together with the same message or none does."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..processes import gpu_count_error
from .averaging import averaging_errors
from .checks import config_errors, raise_if_any
from .collective import first_failure, from_main
from .config import ConfigError, TrainConfig
from .distributed import (
    accelerator_errors,
    is_deepspeed,
    make_accelerator,
    setup_logging,
    warn_about_zero3,
    zero_stage,
)
from .launch import apply_to_deepspeed, resolve_launch
from .ownership import LOCK_NAME, export_errors, output_dir_errors, side_folder_errors
from .resume import pick_resume
from .rundir import RunDir, RunLock, shared_dir_problem


@dataclass
class Preflight:
    config: TrainConfig  # with the settings the launch and the flags both give resolved
    accelerator: Any
    resume_from: Path | None
    run_dir: RunDir


def preflight(config: TrainConfig) -> Preflight:
    """Check every input that needs no model or data and take the output folder's lock; raise one
    ConfigError (on every rank) listing the problems."""
    errors = config_errors(config)
    config, launch_errors = resolve_launch(config)
    errors += launch_errors
    too_many = gpu_count_error()
    if too_many is not None:  # the accelerator itself would fail on the extra ranks
        raise_if_any([*errors, too_many])
    try:
        accelerator = make_accelerator(config)
    except ValueError:
        raise_if_any(errors)  # a bad flag the accelerator tripped over: say what the user can fix
        raise
    setup_logging(accelerator)
    apply_to_deepspeed(accelerator, config)
    errors += averaging_errors(config, zero_stage(accelerator))
    errors += accelerator_errors(accelerator, config)
    lock, decision = None, None
    if accelerator.is_main_process:
        lock, decision = _decide(config, accelerator, errors)
    main_errors, resume = from_main(accelerator, decision)
    # a rank elsewhere may lack an input the main process has (a model folder on its own disk)
    other = first_failure(accelerator, None if accelerator.is_main_process or not errors else "; ".join(errors))
    if main_errors or other:
        if lock is not None:
            lock.release()
        raise_if_any(main_errors or [f"on another machine: {other}"])
    out = Path(config.output_dir)
    problem = shared_dir_problem(accelerator, out)
    if problem is not None:
        if lock is not None:
            lock.release()
        raise ConfigError(problem)
    warn_about_zero3(accelerator, config.teacher)
    return Preflight(config, accelerator, Path(resume) if resume else None, RunDir(out, lock))


def _decide(config: TrainConfig, accelerator: Any, errors: list[str]) -> tuple[RunLock | None, tuple[list[str], Any]]:
    """On the main process: the output folder, the export target and the checkpoint; takes the lock
    when all is well. Returns (lock, (errors, resume path))."""
    out = Path(config.output_dir)
    lock = None
    if (out / LOCK_NAME).is_file():
        lock, error = _take_lock(out)
        if error is not None:
            return None, ([error], None)  # in use by another run (or unwritable): nothing else matters
    plugin = accelerator.state.deepspeed_plugin
    launch = {
        "deepspeed": is_deepspeed(accelerator),
        "zero_stage": plugin.zero_stage if plugin is not None else None,
        "num_processes": accelerator.num_processes,
        "precision": accelerator.mixed_precision,
    }
    resume, resume_errors = pick_resume(config, launch)
    errors = errors + resume_errors + output_dir_errors(config, resuming=config.resume_from_checkpoint is not None)
    errors += side_folder_errors(config) + export_errors(config)
    if not errors and lock is None:
        lock, error = _take_lock(out)
        errors += [error] if error else []
    if errors and lock is not None:
        lock.release()
        lock = None
    return lock, (errors, str(resume) if resume else None)


def _take_lock(out: Path) -> tuple[RunLock | None, str | None]:
    try:
        return RunLock.acquire(out), None
    except ConfigError as err:
        return None, str(err)
    except OSError as err:
        return (
            None,
            f"--output_dir {str(out)!r} cannot be written: {err.strerror or err}; choose a folder you can write to.",
        )
