"""The output folder: a run writes only where it owns the files, one run at a time, replaces an
earlier run only once its own LoRA exists, and a full or read-only disk gives one line with the
earlier files intact."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run_training, subprocess_env, train_args, write_image_folder

ROOT = Path(__file__).resolve().parents[1]
LORA = "pytorch_lora_weights.safetensors"


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    sys.path.insert(0, str(ROOT))
    from train_sd_distil_lora import main

    code = main(argv)
    return code, capsys.readouterr().err


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _lora_disk_full(weights: object, folder: Path, metadata: object) -> None:
    """The final LoRA's writer on a full disk (it raises the one-line error, as replace_atomically does)."""
    from sd_distill.files import write_error

    raise write_error(OSError(errno.ENOSPC, "No space left on device"), Path(folder) / LORA)


def _torch_full(path: Path) -> None:
    path.write_bytes(b"PK")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "data", n=4)


def test_a_folder_of_other_files_is_refused_before_any_model_loads(
    tiny_model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import sd_distill.train.recipe as recipe

    monkeypatch.setattr(recipe, "load_components", lambda *a: pytest.fail("a model was loaded"))
    repo = tmp_path / "repo"  # `--output_dir .` in a repository
    repo.mkdir()
    (repo / "README.md").write_text("# my project\n")
    (repo / "setup.py").write_text("")
    # another tool's LoRA folder (diffusers' dreambooth script writes these two names too)
    other = tmp_path / "other-lora"
    other.mkdir()
    (other / LORA).write_bytes(b"theirs")
    (other / "README.md").write_text("---\ntags: [lora]\n---\n")
    for folder in (repo, other):
        for extra in ((), ("--overwrite_output_dir",)):
            code, err = _main(train_args(tiny_model_dir, data, folder, *extra), capsys)
            assert code == 2 and "not sd-distill outputs" in err and "README.md" in err, err
            assert err.count("\n") == 1  # one line
    assert "setup.py" in _main(train_args(tiny_model_dir, data, repo), capsys)[1]
    assert sorted(os.listdir(repo)) == ["README.md", "setup.py"] and (other / LORA).read_bytes() == b"theirs"


def test_overwrite_keeps_the_previous_run_until_the_new_lora_exists(
    tiny_model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import sd_distill.train.recipe as recipe
    from sd_distill.train import TrainingError

    out = tmp_path / "out"
    run_training(train_args(tiny_model_dir, data, out, steps=2))
    old = (out / LORA).read_bytes()
    before = sorted(os.listdir(out))

    code, err = _main(train_args(tiny_model_dir, data, out, "--overwrite_output_dir", "--resolution", "100"), capsys)
    assert code == 2 and (out / LORA).read_bytes() == old  # a bad flag: nothing touched

    def failing_loop(training):  # the new run writes a checkpoint of its own, then fails
        (out / "checkpoint-6").mkdir()
        raise TrainingError("the loss was non-finite")

    monkeypatch.setattr(recipe, "train_loop", failing_loop)
    code, err = _main(train_args(tiny_model_dir, data, out, "--overwrite_output_dir", "--seed", "7"), capsys)
    assert code == 2 and "non-finite" in err
    assert (out / LORA).read_bytes() == old and sorted(os.listdir(out)) == sorted(before + [_only(out, "abandoned-")])
    assert (out / _only(out, "abandoned-") / "checkpoint-6").is_dir()  # the failed run's output, set aside

    monkeypatch.undo()
    run_training(train_args(tiny_model_dir, data, out, "--overwrite_output_dir", "--seed", "7", steps=2))
    assert (out / LORA).read_bytes() != old and not list(out.glob(".sd-distill-previous-*"))


def test_an_overwrite_run_that_fails_at_its_lora_goes_on_from_its_set_aside_checkpoint(
    tiny_model_dir: Path,
    data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch,
) -> None:
    """Attack finding F3: the failure puts the previous, finished run back, so `latest` used to say
    "nothing to do" and exit 0 with the *previous* LoRA. Now `latest` names the failed run's checkpoint,
    and resuming from it with --overwrite_output_dir gives what an uninterrupted run gives."""
    import torch
    from safetensors.torch import load_file

    import sd_distill.train.outputs as outputs

    out, again = tmp_path / "out", ("--overwrite_output_dir", "--seed", "7")
    run_training(train_args(tiny_model_dir, data, out, steps=4))
    previous = (out / LORA).read_bytes()
    run_training(train_args(tiny_model_dir, data, tmp_path / "whole", *again, steps=4))  # the run, uninterrupted

    with monkeypatch.context() as m:  # the disk fills at the new run's final LoRA
        m.setattr(outputs, "save_student", _lora_disk_full)
        code, err = _main(train_args(tiny_model_dir, data, out, *again, steps=4), capsys)
    assert code == 2 and "no space left" in err and (out / LORA).read_bytes() == previous  # put back
    kept = out / _only(out, "abandoned-") / "checkpoint-4"
    go_on = f"--resume_from_checkpoint {kept} --overwrite_output_dir"
    assert go_on in caplog.text

    code, err = _main(
        train_args(tiny_model_dir, data, out, *again, "--resume_from_checkpoint", "latest", steps=4), capsys
    )
    assert code == 2 and "run that was replacing it failed" in err and go_on in err and err.count("\n") == 1, err
    assert (out / LORA).read_bytes() == previous

    code, err = _main(train_args(tiny_model_dir, data, out, "--resume_from_checkpoint", str(kept), steps=4), capsys)
    assert code == 2 and "pass --overwrite_output_dir to replace that run" in err  # never mixed into it silently
    assert (out / LORA).read_bytes() == previous

    run_training(train_args(tiny_model_dir, data, out, *again, "--resume_from_checkpoint", str(kept), steps=4))
    ours, whole = load_file(str(out / LORA)), load_file(str(tmp_path / "whole" / LORA))
    assert ours.keys() == whole.keys() and all(torch.equal(ours[k], whole[k]) for k in ours)  # bit-identical
    assert not list(out.glob(".sd-distill-previous-*"))  # the previous run was replaced, once this LoRA existed
    code, err = _main(
        train_args(tiny_model_dir, data, out, *again, "--resume_from_checkpoint", "latest", steps=4), capsys
    )
    assert code == 0  # this run is the folder's now: nothing to do, no pointer to its own set-aside checkpoint


def test_a_run_that_finishes_later_is_not_taken_for_the_run_a_failed_replacement_was_replacing(
    tiny_model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """An unfinished run, an --overwrite_output_dir run over it that fails, then a plain run that finishes:
    `latest` has nothing to do (the failed run was never replacing this one)."""
    import sd_distill.train.outputs as outputs

    out, one_step = tmp_path / "out", ("--checkpointing_steps", "1")
    with monkeypatch.context() as m:
        m.setattr(outputs, "save_student", _lora_disk_full)
        assert _main(train_args(tiny_model_dir, data, out, "--checkpointing_steps", "5", steps=1), capsys)[0] == 2
        assert (
            _main(train_args(tiny_model_dir, data, out, "--overwrite_output_dir", *one_step, steps=1), capsys)[0] == 2
        )
    assert list(out.glob("abandoned-failed-overwrite-*/checkpoint-1"))
    run_training(train_args(tiny_model_dir, data, out, *one_step, steps=1))
    code, err = _main(train_args(tiny_model_dir, data, out, "--resume_from_checkpoint", "latest", steps=1), capsys)
    assert code == 0, err


def test_a_disk_too_full_to_set_the_failed_run_aside_still_ends_with_its_own_line(
    tiny_model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import sd_distill.train.outputs as outputs
    import sd_distill.train.rundir as rundir

    out = tmp_path / "out"
    run_training(train_args(tiny_model_dir, data, out, steps=2))
    monkeypatch.setattr(outputs, "save_student", _lora_disk_full)
    real = rundir._set_aside
    monkeypatch.setattr(
        rundir, "_set_aside", lambda o, paths, prefix: _no_space() if "failed" in prefix else real(o, paths, prefix)
    )
    code, err = _main(train_args(tiny_model_dir, data, out, "--overwrite_output_dir", steps=2), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "no space left" in errors[0] and "Traceback" not in err, err
    assert list(out.glob(".sd-distill-previous-*/" + LORA))  # where the message logged says it is


def test_latest_after_a_resume_from_an_earlier_step_is_not_taken_for_a_failed_replacement(
    tiny_model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The later branch a resume from an earlier step sets aside is not a failed --overwrite_output_dir run."""
    out = tmp_path / "out"
    run_training(train_args(tiny_model_dir, data, out, steps=4))
    run_training(train_args(tiny_model_dir, data, out, "--resume_from_checkpoint", str(out / "checkpoint-2"), steps=4))
    assert list(out.glob("abandoned-*/checkpoint-4"))
    code, err = _main(train_args(tiny_model_dir, data, out, "--resume_from_checkpoint", "latest", steps=4), capsys)
    assert code == 0, err


def test_a_damaged_checkpoint_of_a_failed_replacement_is_not_pointed_to(
    tiny_model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import sd_distill.train.outputs as outputs

    out = tmp_path / "out"
    run_training(train_args(tiny_model_dir, data, out, steps=2))
    with monkeypatch.context() as m:
        m.setattr(outputs, "save_student", _lora_disk_full)
        assert _main(train_args(tiny_model_dir, data, out, "--overwrite_output_dir", steps=2), capsys)[0] == 2
    (out / _only(out, "abandoned-") / "checkpoint-2" / "training_state.json").write_text("{not json")
    code, err = _main(train_args(tiny_model_dir, data, out, "--resume_from_checkpoint", "latest", steps=2), capsys)
    assert code == 0 and "Traceback" not in err  # the finished run: nothing to do


def test_a_failed_resume_of_a_set_aside_checkpoint_puts_the_finished_run_back(
    tiny_model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """Going on from a checkpoint outside the folder with --overwrite_output_dir replaces the run there
    as a fresh overwrite does: only once the new LoRA exists (a second failure leaves it in place)."""
    import sd_distill.train.outputs as outputs

    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    run_training(train_args(tiny_model_dir, data, elsewhere, "--seed", "7", steps=2))
    run_training(train_args(tiny_model_dir, data, out, steps=4))
    previous = sorted(os.listdir(out)), (out / LORA).read_bytes()
    monkeypatch.setattr(outputs, "save_student", _lora_disk_full)
    resume = ("--overwrite_output_dir", "--seed", "7", "--resume_from_checkpoint", str(elsewhere / "checkpoint-2"))
    code, err = _main(train_args(tiny_model_dir, data, out, *resume, steps=4), capsys)
    assert code == 2 and "no space left" in err
    assert (out / LORA).read_bytes() == previous[1]
    assert [n for n in sorted(os.listdir(out)) if not n.startswith("abandoned-")] == previous[0]


def _only(out: Path, prefix: str) -> str:
    (name,) = [n for n in os.listdir(out) if n.startswith(prefix)]
    return name


def test_export_targets_that_would_overwrite_something_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill.train.config import TrainConfig
    from sd_distill.train.ownership import export_errors

    out = tmp_path / "out"
    other_run = tmp_path / "other-run"
    other_run.mkdir()
    (other_run / ".sd-distill.lock").write_text("")
    (other_run / LORA).write_bytes(b"x")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.png").write_bytes(b"x")
    (tmp_path / "afile").write_text("")
    refused = {
        tiny_model_dir: "base model",
        out: "--output_dir",
        out / "fused": "--output_dir",
        tmp_path: "--output_dir",  # above it
        other_run: "another sd-distill run",
        foreign: "holds other files",
        tmp_path / "afile": "is a file",
    }
    for target, said in refused.items():
        config = TrainConfig(
            pretrained_model_name_or_path=str(tiny_model_dir), output_dir=str(out), export_fused_pipeline=str(target)
        )
        errors = export_errors(config)
        assert len(errors) == 1 and said in errors[0], (target, errors)
    config = TrainConfig(output_dir=str(out), export_fused_pipeline=str(tmp_path / "new" / "fused"))
    assert export_errors(config) == []


def test_an_export_into_a_folder_the_run_fills_is_refused(tmp_path: Path) -> None:
    """Empty at the start, the cache, the buffer and the logs fill during training; a later export
    swapped in over them would delete them."""
    from sd_distill.train.config import TrainConfig
    from sd_distill.train.ownership import export_errors

    out, side = tmp_path / "out", tmp_path / "side"
    for flag, settings in (
        ("--cache_dir", {"cache_dir": str(side / "cache")}),
        ("--trajectory_dir", {"trajectory_dir": str(side / "buffer")}),
        ("--logging_dir", {"logging_dir": str(side / "logs")}),  # an absolute one leaves the output folder
    ):
        config = TrainConfig(output_dir=str(out), export_fused_pipeline=str(side), **settings)
        errors = export_errors(config)
        assert len(errors) == 1 and f"is {flag} or above it" in errors[0], (flag, errors)
        within = str(Path(*settings.values(), "fused"))
        inside = TrainConfig(output_dir=str(out), export_fused_pipeline=within, **settings)
        assert export_errors(inside) == []  # inside one of them nothing of theirs is replaced


def test_an_earlier_export_the_user_added_to_is_not_replaced(
    tiny_model_dir: Path, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    from sd_distill.files import OutputWriteError
    from sd_distill.train.config import TrainConfig
    from sd_distill.train.export import export_fused_pipeline
    from sd_distill.train.ownership import export_errors, is_fused_export

    target = tmp_path / "fused"
    export_fused_pipeline(str(tiny_model_dir), tiny_lora_dir, str(target))
    assert is_fused_export(target)
    (target / ".git").mkdir()  # made a hub clone since
    (target / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert not is_fused_export(target)
    config = TrainConfig(output_dir=str(tmp_path / "out"), export_fused_pipeline=str(target))
    assert "is an earlier export with .git added since" in export_errors(config)[0]
    # and one that became the user's while the run trained is left alone at export time
    with pytest.raises(OutputWriteError, match="left as it is; the student is in"):
        export_fused_pipeline(str(tiny_model_dir), tiny_lora_dir, str(target))
    assert (target / ".git" / "HEAD").is_file()


def test_an_export_killed_between_its_renames_gets_its_earlier_export_back(
    tiny_model_dir: Path, tiny_lora_dir: Path, tmp_path: Path
) -> None:
    from sd_distill.train.export import export_fused_pipeline

    target = tmp_path / "fused"
    export_fused_pipeline(str(tiny_model_dir), tiny_lora_dir, str(target))
    moved = tmp_path / ".fused.old-999999999"  # a dead process moved it aside, then died
    os.replace(target, moved)
    half = tmp_path / ".fused.tmp-999999999"
    (half / "unet").mkdir(parents=True)
    export_fused_pipeline(str(tiny_model_dir), tiny_lora_dir, str(target))
    assert sorted(os.listdir(tmp_path)) == ["fused"]


def test_a_second_run_on_the_same_folder_stops_at_once(tiny_model_dir: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = str(ROOT / "train_sd_distil_lora.py")
    first = subprocess.Popen(
        [sys.executable, script, *train_args(tiny_model_dir, data, out, "--checkpointing_steps", "1000", steps=100000)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = out / ".sd-distill.lock"
        deadline = time.monotonic() + 120
        while not (lock.is_file() and str(first.pid) in lock.read_text()) and time.monotonic() < deadline:
            assert first.poll() is None, "the first run stopped"
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, script, *train_args(tiny_model_dir, data, out, "--resume_from_checkpoint", "latest")],
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.poll() is None, "the first run was disturbed"
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    (line,) = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert "in use by another sd-distill run" in line and f"pid {first.pid}" in line and str(out) in line


# How writers report a full disk (seen on a 300 KB tmpfs): OSError from Python's own files and PIL,
# safetensors' Rust error with the errno in its text, torch.save's "unexpected pos" with no errno.
FULL_DISK = {
    "OSError": lambda: _no_space(),
    "safetensors": lambda: (_ for _ in ()).throw(RuntimeError("I/O error: No space left on device (os error 28)")),
}


@pytest.mark.parametrize("style", FULL_DISK)
def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_ones(
    style: str, tiny_model_dir: Path, data: Path, tmp_path: Path, monkeypatch
) -> None:
    import sd_distill.train.checkpoint as checkpoint
    from sd_distill.files import OutputWriteError
    from sd_distill.train.integrity import checkpoint_damage

    real = checkpoint.save_student

    def save_student(weights, folder, metadata):  # the disk fills up while checkpoint-4 is written
        return FULL_DISK[style]() if ".checkpoint-4.tmp" in str(folder) else real(weights, folder, metadata)

    monkeypatch.setattr(checkpoint, "save_student", save_student)
    out = tmp_path / "out"
    with pytest.raises(OutputWriteError) as raised:
        run_training(train_args(tiny_model_dir, data, out, steps=6))
    message = str(raised.value)
    assert "no space left on the device" in message and "checkpoint-4" in message and "free" in message
    assert "needed" in message and "the earlier checkpoints are intact" in message
    assert not list(out.glob(".checkpoint-*")) and checkpoint_damage(out / "checkpoint-2") == []


def test_a_full_disk_at_the_final_save_is_one_error_and_leaves_the_checkpoints(
    tiny_model_dir: Path, data: Path, tmp_path: Path, monkeypatch
) -> None:
    from diffusers import StableDiffusionPipeline

    from sd_distill.files import TEMP_MARK, OutputWriteError
    from sd_distill.train.integrity import checkpoint_damage

    out = tmp_path / "out"
    real = StableDiffusionPipeline.save_lora_weights.__func__

    def save_lora_weights(cls, folder, **kwargs):  # the disk is full when the final LoRA is written
        if Path(folder) == out:
            FULL_DISK["safetensors"]()
        return real(cls, folder, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", classmethod(save_lora_weights))
    with pytest.raises(OutputWriteError) as raised:
        run_training(train_args(tiny_model_dir, data, out, steps=4))
    assert "no space left on the device" in str(raised.value) and LORA in str(raised.value)
    assert not (out / LORA).exists() and not [p for p in out.iterdir() if TEMP_MARK in p.name]
    assert checkpoint_damage(out / "checkpoint-4") == []  # the run can still be saved from its last checkpoint


def test_a_full_disk_never_leaves_a_half_file_over_a_good_one(tiny_lora_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch
    from safetensors.torch import load_file

    from sd_distill.files import OutputWriteError, write_atomically
    from sd_distill.lora import save_lora

    state = load_file(str(tiny_lora_dir / LORA))
    save_lora(state, tmp_path, {"r": 4, "lora_alpha": 4, "target_modules": ["to_q"]})
    good = (tmp_path / LORA).read_bytes()

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        _no_space()

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    with pytest.raises(OutputWriteError, match=r"no space left on the device writing .*pytorch_lora_weights"):
        save_lora({k: v * 2 for k, v in state.items()}, tmp_path, {"r": 4})
    monkeypatch.undo()
    assert (tmp_path / LORA).read_bytes() == good and sorted(os.listdir(tmp_path)) == [LORA]

    import sd_distill.files as files

    monkeypatch.setattr(files, "free_bytes", lambda path: 4096)  # torch.save says only "unexpected pos"
    with pytest.raises(OutputWriteError, match=r"no space left .*optimizer.bin.*4.0 KB free"):
        files.replace_atomically(tmp_path / "optimizer.bin", lambda tmp: _torch_full(tmp))
    monkeypatch.undo()

    (tmp_path / "train_summary.json").write_text('{"good": true}')
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: _no_space())
    with pytest.raises(OutputWriteError, match="train_summary.json"):
        write_atomically(tmp_path / "train_summary.json", '{"global_step": 2}')
    monkeypatch.undo()
    assert (tmp_path / "train_summary.json").read_text() == '{"good": true}' and len(os.listdir(tmp_path)) == 2


def test_a_full_disk_during_the_fused_export_keeps_an_earlier_export(
    tiny_model_dir: Path, tiny_lora_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    from diffusers import StableDiffusionPipeline

    from sd_distill.files import OutputWriteError
    from sd_distill.train.export import export_fused_pipeline

    target = tmp_path / "fused"
    killed = tmp_path / ".fused.tmp-999999999"  # a half export of a process that was killed
    (killed / "unet").mkdir(parents=True)
    export_fused_pipeline(str(tiny_model_dir), tiny_lora_dir, str(target))
    assert not killed.exists()
    index = (target / "model_index.json").read_bytes()
    real = StableDiffusionPipeline.save_pretrained

    def fills_up(self, folder, **kwargs):
        real(self, folder, **kwargs)  # most of it written, then the disk is full
        _no_space()

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", fills_up)
    with pytest.raises(OutputWriteError, match=r"no space left .*fused.*needed.*free") as said:
        export_fused_pipeline(str(tiny_model_dir), tiny_lora_dir, str(target))
    amount, unit = re.search(r"about ([\d.]+) (KB|MB|GB) needed", str(said.value)).groups()
    written = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    assert float(amount) * 2 ** (10 * "KMG".index(unit[0]) + 10) >= written  # not an under-estimate (F8)
    assert (target / "model_index.json").read_bytes() == index and sorted(os.listdir(tmp_path)) == ["fused"]
    StableDiffusionPipeline.from_pretrained(target)  # the earlier export is whole: it still loads
    monkeypatch.undo()
    export_fused_pipeline(str(tiny_model_dir), tiny_lora_dir, str(target))  # and is replaced once a new one is whole
    assert sorted(os.listdir(tmp_path)) == ["fused"]


def test_a_full_disk_at_the_export_after_training_says_how_to_export_without_training_again(
    tiny_model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """Attack finding F8: the LoRA is saved before the export; the line says how to export it afterwards."""
    import shlex

    from diffusers import StableDiffusionPipeline

    out, fused = tmp_path / "out", tmp_path / "fused"
    with monkeypatch.context() as m:
        m.setattr(StableDiffusionPipeline, "save_pretrained", _no_space)
        code, err = _main(train_args(tiny_model_dir, data, out, "--export_fused_pipeline", str(fused), steps=2), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "no space left" in errors[0] and (out / LORA).is_file(), err
    command = re.search(r"`(python export_fused_pipeline\.py [^`]*)`", err).group(1)
    sys.path.insert(0, str(ROOT))
    from export_fused_pipeline import main as export_main

    assert export_main(shlex.split(command)[2:]) == 0  # the hint, followed as given
    StableDiffusionPipeline.from_pretrained(fused)


def test_an_output_dir_that_is_a_file_or_read_only_is_refused(
    tiny_model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    import tempfile

    (tmp_path / "a-file").write_text("")
    code, err = _main(train_args(tiny_model_dir, data, tmp_path / "a-file"), capsys)
    assert code == 2 and "is a file" in err
    for flag in ("--cache_dir", "--logging_dir"):
        code, err = _main(train_args(tiny_model_dir, data, tmp_path / "out", flag, str(tmp_path / "a-file")), capsys)
        assert code == 2 and f"{flag} " in err and "is a file" in err

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    if os.geteuid() == 0:  # root writes through permission bits: make the write itself fail, as a ro mount does
        monkeypatch.setattr(
            tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system"))
        )
    else:
        read_only.chmod(0o555)
    for out in (read_only, read_only / "new"):
        code, err = _main(train_args(tiny_model_dir, data, out), capsys)
        assert code == 2 and ("Read-only file system" in err or "Permission denied" in err), err
        assert err.count("error: ") == 1
    read_only.chmod(0o755)


def test_a_full_disk_while_writing_validation_images_stops_with_one_line(
    tiny_model_dir: Path, data: Path, tmp_path: Path, monkeypatch
) -> None:
    from PIL import Image

    from sd_distill.files import OutputWriteError

    monkeypatch.setattr(Image.Image, "save", _no_space)
    out = tmp_path / "out"
    argv = ("--validation_steps", "2", "--num_validation_inference_steps", "1", "--default_prompt", "a red circle")
    with pytest.raises(OutputWriteError, match=r"no space left on the device writing .*validation/step-2"):
        run_training(train_args(tiny_model_dir, data, out, *argv, steps=4))
    assert (out / "checkpoint-2").is_dir()  # the checkpoint written just before is intact


def test_a_final_render_that_fails_leaves_the_lora_saved(
    tiny_model_dir: Path, data: Path, tmp_path: Path, monkeypatch
) -> None:
    """The last images are rendered after the LoRA is written, so running out of memory there costs
    the images, not the run's result."""
    from sd_distill.constants import LORA_WEIGHTS_NAME
    from sd_distill.train import recipe

    def out_of_memory(*args, **kwargs) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(recipe, "run_validation", out_of_memory)  # the final render only; the loop has its own
    out = tmp_path / "out"
    argv = ("--validation_steps", "3", "--num_validation_inference_steps", "1", "--default_prompt", "a red circle")
    with pytest.raises(RuntimeError, match="out of memory"):
        run_training(train_args(tiny_model_dir, data, out, *argv, steps=4))
    assert (out / LORA_WEIGHTS_NAME).is_file() and (out / "validation" / "step-3").is_dir()


def test_a_failed_summary_write_is_raised_and_a_good_one_written(tmp_path) -> None:
    """What ``finish`` does on every rank: the main process writes; its failure is everyone's."""
    from types import SimpleNamespace

    from sd_distill.files import OutputWriteError
    from sd_distill.train.collective import main_process_writes

    main = SimpleNamespace(is_main_process=True, num_processes=1)
    written = tmp_path / "summary.json"
    main_process_writes(main, lambda: written.write_text("{}"))
    assert written.read_text() == "{}"

    def full_disk() -> None:
        raise OutputWriteError("no space left on the device")

    with pytest.raises(OutputWriteError, match="no space left"):
        main_process_writes(main, full_disk)
    other = SimpleNamespace(is_main_process=False, num_processes=1)
    main_process_writes(other, full_disk)  # only the main process writes


def test_any_error_of_the_main_process_writing_stops_the_other_ranks_too(monkeypatch) -> None:
    """An error that is not a full disk (e.g. the export's base gone) must not leave the other ranks
    waiting in the agreement until --ddp_timeout: the main process raises it, the others its line."""
    from types import SimpleNamespace

    from sd_distill.files import OutputWriteError
    from sd_distill.train import collective

    shared: list[str | None] = []

    def agree(accelerator, message):  # what every rank of a 2-process run learns: the main one's line
        if accelerator.is_main_process:
            shared.append(message)
        return shared[0]

    monkeypatch.setattr(collective, "first_failure", agree)

    def broken() -> None:
        raise RuntimeError("the base model folder is gone")

    with pytest.raises(RuntimeError, match="base model folder is gone"):  # the main one keeps its traceback
        collective.main_process_writes(SimpleNamespace(is_main_process=True, num_processes=2), broken)
    with pytest.raises(OutputWriteError, match="main process failed .*RuntimeError: the base model folder is gone"):
        collective.main_process_writes(SimpleNamespace(is_main_process=False, num_processes=2), broken)


def test_the_model_card_says_how_to_load_a_half_precision_export() -> None:
    from sd_distill.train.config import TrainConfig
    from sd_distill.train.outputs import model_card

    ranged = {"guidance_scale_range": [1.5, 10.0], "export_fused_pipeline": "fused"}
    half = model_card(TrainConfig(**ranged, export_dtype="fp16"))
    assert "from_pretrained(DIR, torch_dtype=torch.float16)" in half
    assert "from_pretrained(DIR)" in model_card(TrainConfig(**ranged))


def test_a_disk_full_between_the_final_files_leaves_no_lora_without_its_projection(tmp_path: Path, monkeypatch) -> None:
    import errno

    import torch

    import sd_distill.conditioning as conditioning
    from sd_distill.conditioning import StudentWeights, save_student
    from sd_distill.constants import GUIDANCE_PROJ_WEIGHTS_NAME, LORA_WEIGHTS_NAME

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    weights = StudentWeights(lora={"unet.a.lora_A.weight": torch.ones(2, 2)}, guidance_projection=torch.ones(4, 8))
    for failing in ("save_lora", "save_guidance_projection"):
        folder = tmp_path / failing
        folder.mkdir()
        with monkeypatch.context() as m:
            m.setattr(conditioning, failing, full)
            with pytest.raises(OSError):
                save_student(weights, folder, {})
        assert not (folder / LORA_WEIGHTS_NAME).exists()  # the finished-run marker is never there alone
    assert (tmp_path / "save_lora" / GUIDANCE_PROJ_WEIGHTS_NAME).is_file()
