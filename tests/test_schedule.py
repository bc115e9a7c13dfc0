"""The step arithmetic: how many optimizer steps a run makes, and where a resumed run goes on."""

from __future__ import annotations

import pytest

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


def test_a_range_student_decays_its_learning_rate_at_the_end_and_a_fixed_w_one_keeps_it() -> None:
    from sd_distill.train.config import TrainConfig

    ranged = TrainConfig(guidance_scale_range=[1.5, 10.0])
    assert (ranged.lr_scheduler, ranged.lr_decay_fraction) == ("warmup_stable_decay", 0.2)
    assert (TrainConfig().lr_scheduler, TrainConfig().lr_decay_fraction) == ("constant", None)
    assert TrainConfig(guidance_scale_range=[1.5, 10.0], lr_scheduler="constant").lr_decay_fraction is None


@pytest.mark.parametrize("processes", [1, 2])
def test_the_decay_is_linear_to_zero_over_the_last_fraction_of_the_steps(processes: int) -> None:
    import torch

    from sd_distill.train.config import TrainConfig
    from sd_distill.train.optimizer import lr_schedule

    config = TrainConfig(lr_scheduler="warmup_stable_decay", lr_decay_fraction=0.5, lr_warmup_steps=2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = lr_schedule(config, optimizer, max_steps=10, num_processes=processes)
    seen = []
    for _ in range(10):  # the learning rate of each optimizer step; the prepared scheduler steps once per process
        seen.append(schedule.get_last_lr()[0])
        for _ in range(processes):
            optimizer.step()
            schedule.step()
    expected = [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2]  # warm-up 2, stable 3, decay 5
    assert seen == pytest.approx(expected)


def test_a_run_given_more_steps_goes_on_at_the_stretched_schedule_not_at_its_decayed_end() -> None:
    import torch

    from sd_distill.train.config import TrainConfig
    from sd_distill.train.optimizer import lr_schedule
    from sd_distill.train.resume import honour_learning_rate

    config = TrainConfig(lr_scheduler="warmup_stable_decay", lr_decay_fraction=0.5)

    def rates(max_steps: int, steps: int, state: dict | None = None, peak: float = 1.0) -> tuple[list[float], dict]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = lr_schedule(config, optimizer, max_steps=max_steps, num_processes=1)
        if state is not None:  # what load_state restores: the schedule's position and the optimizer's last rate
            schedule.load_state_dict(state["schedule"])
            optimizer.param_groups[0]["lr"] = state["lr"]
            honour_learning_rate(schedule, peak)
        seen = []
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return seen, {"schedule": schedule.state_dict(), "lr": optimizer.param_groups[0]["lr"]}

    _, ended = rates(4, 4)
    assert ended["lr"] == 0.0  # a finished run's optimizer holds the decayed rate
    whole, _ = rates(8, 8)
    resumed, _ = rates(8, 4, ended)
    assert resumed == pytest.approx(whole[4:])  # steps 4-7 of the 8-step schedule, the first not at 0
    halved, _ = rates(8, 4, ended, peak=0.5)
    assert halved == pytest.approx([r / 2 for r in whole[4:]])


@pytest.mark.parametrize(
    "steps, fraction, decayed", [(100, 0.07, 7), (10, 0.2, 2), (7, 0.5, 4), (3, 0.01, 1), (4, 1.0, 4)]
)
def test_the_decay_is_the_fraction_of_the_steps_rounded_up_not_its_float_error(
    steps: int, fraction: float, decayed: int
) -> None:
    from sd_distill.train.schedule import decay_steps

    assert decay_steps(steps, fraction) == decayed  # 100 * 0.07 is 7.000000000000001 in floats
