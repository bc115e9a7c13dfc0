"""The step arithmetic: how many optimizer steps a run makes, and where a resumed run goes on."""

from __future__ import annotations

from sd_distill.train.schedule import Schedule


def _plan(
    rows: int | None, *, batch: int = 2, procs: int = 1, accum: int = 1, steps: int | None = None, epochs: int = 1
) -> Schedule:
    return Schedule.plan(
        rows=rows,
        batch_size=batch,
        num_processes=procs,
        accumulation=accum,
        max_train_steps=steps,
        num_train_epochs=epochs,
    )


def test_epochs_count_batches_over_all_processes() -> None:
    assert _plan(10, batch=2, procs=2).batches_per_epoch == 3  # ceil(10 / 4): the last batch is short


def test_a_partial_accumulation_window_ends_with_the_epoch() -> None:
    schedule = _plan(10, batch=2, accum=2)  # 5 batches -> updates after 2, 4 and 5
    assert schedule.updates_per_epoch == 3


def test_max_steps_come_from_epochs_unless_given() -> None:
    assert _plan(10, epochs=3).max_steps == 15
    assert _plan(10, epochs=3, steps=7).max_steps == 7


def test_a_stream_has_no_epochs_and_needs_max_steps() -> None:
    schedule = _plan(None, steps=9, accum=2)
    assert schedule.batches_per_epoch is None and schedule.updates_per_epoch is None
    assert schedule.resume_point(4) == (0, 8)  # skip what was consumed


def test_resume_point_is_the_epoch_and_the_batches_already_done_in_it() -> None:
    schedule = _plan(10, batch=2, accum=1)  # 5 updates per epoch
    assert schedule.resume_point(0) == (0, 0)
    assert schedule.resume_point(7) == (1, 2)
    assert _plan(16, batch=2, accum=2).resume_point(5) == (1, 2)  # 4 updates/epoch, 1 done = 2 batches


def test_micro_step_counter_continues_where_an_uninterrupted_run_is() -> None:
    schedule = _plan(10, batch=2)
    epoch, skip = schedule.resume_point(7)
    assert schedule.micro_step(epoch, skip) == 7  # 5 batches of epoch 0 + 2 of epoch 1
    stream = _plan(None, steps=10, accum=3)
    assert stream.micro_step(*stream.resume_point(4)) == 12  # still in its first pass


def test_a_stream_read_through_becomes_an_epoch_schedule() -> None:
    # 5 batches per pass, accumulated by 2: updates after batches 2, 4 and 5 of every pass
    stream = _plan(None, steps=10, accum=2).with_epoch_length(5)
    assert stream.updates_per_epoch == 3
    assert stream.resume_point(4) == (1, 2)  # beyond the first pass: not 8 batches into it
    assert stream.micro_step(1, 2) == 7
