"""The comparison loop's inputs are checked before any model loads, and its --out_dir is written
without replacing a file it did not write."""

from __future__ import annotations

import errno
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from unittest.mock import Mock

import pytest

from sd_distill.eval.config import CompareConfig, CompareError, resolve
from sd_distill.eval.outdir import MANIFEST, write_atomic


def _config(lora: Path, tmp_path: Path, **kw: object) -> CompareConfig:
    return CompareConfig(ft_model=str(lora), out_dir=str(tmp_path / "o"), prompts=["a cat"], **kw)  # type: ignore[arg-type]


def _lora_with(tmp_path: Path, lora: Path, **recorded: object) -> Path:
    """A copy of ``lora`` whose sd_distill_config.json records ``recorded`` on top of the original."""
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes((lora / "pytorch_lora_weights.safetensors").read_bytes())
    saved = json.loads((lora / "sd_distill_config.json").read_text())
    (folder / "sd_distill_config.json").write_text(json.dumps({**saved, **recorded}))
    return folder


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"device": "banana"}, "--device 'banana' is not a device"),
        ({"device": "meta"}, "renders on cpu, cuda or mps"),
        ({"seed": -1}, "--seed -1 must be in [0, 2**64)"),
        ({"guidance_scale": 0.5}, "--guidance_scale 0.5 must be a number of at least 1"),
        ({"ft_guidance_scale": float("nan")}, "--ft_guidance_scale nan"),
        ({"scheduler": "pndm", "num_inference_steps": 3}, "PNDM without skip_prk_steps needs"),
        ({"num_inference_steps": 0}, "--num_inference_steps must be >= 1"),
        ({"num_inference_steps": 1001}, "--num_inference_steps 1001 is more than the 1000 timesteps"),
    ],
)
def test_bad_flags_are_refused_before_loading(tiny_lora_dir: Path, tmp_path: Path, kw: dict, words: str) -> None:
    with pytest.raises(CompareError) as err:
        resolve(_config(tiny_lora_dir, tmp_path, **kw))
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()


def test_pndm_with_four_steps_is_fine(tiny_lora_dir: Path, tmp_path: Path) -> None:
    resolve(_config(tiny_lora_dir, tmp_path, scheduler="pndm", num_inference_steps=4))


def test_a_scheduler_whose_package_is_missing(tiny_lora_dir: Path, tmp_path: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(CompareError, match=r"--scheduler lms needs the scipy package: pip install scipy"):
        resolve(_config(tiny_lora_dir, tmp_path, scheduler="lms"))


@pytest.mark.parametrize(
    "recorded, words",
    [
        ({"guidance_scale": "seven"}, "records guidance_scale 'seven', not a number"),
        ({"guidance_scale": True}, "records guidance_scale True"),
        ({"guidance_scale": float("inf")}, "records guidance_scale inf"),
        ({"revision": 3}, "records revision 3, not a string"),
    ],
)
def test_a_recorded_config_that_is_not_usable(tiny_lora_dir: Path, tmp_path: Path, recorded: dict, words: str) -> None:
    with pytest.raises(CompareError, match="pass --"):
        try:
            resolve(_config(_lora_with(tmp_path, tiny_lora_dir, **recorded), tmp_path))
        except CompareError as err:
            assert words in str(err)
            raise


def test_a_prompts_file_that_is_not_utf8(tiny_lora_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a caf\u00e9\n".encode("latin-1"))
    config = CompareConfig(ft_model=str(tiny_lora_dir), out_dir=str(tmp_path / "o"), prompts_file=str(prompts))
    with pytest.raises(CompareError, match=r"is not UTF-8 text \(byte 0xe9 at offset 5\); save it as UTF-8"):
        resolve(config)


def test_an_out_dir_that_is_a_file_or_read_only(tiny_lora_dir: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "o").write_text("a file")
    with pytest.raises(CompareError, match="is a file, not a folder"):
        resolve(_config(tiny_lora_dir, tmp_path))
    with pytest.raises(CompareError, match=r"cannot be created: .* is a file"):
        resolve(CompareConfig(ft_model=str(tiny_lora_dir), out_dir=str(tmp_path / "o" / "sub"), prompts=["a"]))
    (tmp_path / "o").unlink()
    (tmp_path / "o").mkdir()
    import sd_distill.eval.outdir as outdir

    monkeypatch.setattr(outdir.os, "access", lambda *a: False)  # root may write anywhere: pretend
    with pytest.raises(CompareError, match="is not writable"):
        resolve(_config(tiny_lora_dir, tmp_path))


def test_files_it_did_not_write_are_never_replaced(tiny_lora_dir: Path, tmp_path: Path) -> None:
    from sd_distill.eval.compare import run

    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "grid.png").write_text("my own grid")
    config = _config(tiny_lora_dir, tmp_path, num_inference_steps=2)
    with pytest.raises(CompareError, match=r"holds files this tool did not write and would replace: grid.png"):
        run(config)
    (out / "grid.png").unlink()
    report = run(config)
    again = run(config)  # its own files: replaced without a question
    assert again["images"] == report["images"]
    assert (out / "notes.txt").read_text() == "mine"
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"notes.txt", MANIFEST}
    assert written == set(json.loads((out / MANIFEST).read_text())["files"])
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")

    def fill_disk(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CompareError, match=r"no space left on the device writing .*report.json \(\d+ MB free"):
        write_atomic(target, fill_disk)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_scales_the_report_would_name_alike_are_refused(tiny_lora_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CompareError, match="differ by less than the report names them"):
        resolve(_config(tiny_lora_dir, tmp_path, guidance_scales=[2.0, 7.5, 7.5000001]))


def _range_student(tmp_path: Path, lora: Path, with_projection: bool = True) -> Path:
    import torch

    from sd_distill.conditioning import save_guidance_projection

    folder = _lora_with(tmp_path, lora, guidance_scale_range=[2.0, 8.0])
    if with_projection:
        save_guidance_projection(torch.zeros(8, 32), folder)
    return folder


def test_a_range_student_without_its_projection_is_refused(tiny_lora_dir: Path, tmp_path: Path) -> None:
    folder = _range_student(tmp_path, tiny_lora_dir, with_projection=False)
    with pytest.raises(CompareError, match="holds a --guidance_scale_range student"):
        resolve(_config(folder, tmp_path))
    assert not (tmp_path / "o").exists()


def test_ft_guidance_scale_is_refused_for_a_student_told_w(tiny_lora_dir: Path, tmp_path: Path) -> None:
    folder = _range_student(tmp_path, tiny_lora_dir)
    with pytest.raises(CompareError, match="applies to a fixed-w student"):
        resolve(_config(folder, tmp_path, ft_guidance_scale=2.0))
    assert resolve(_config(folder, tmp_path)).conditioned


def test_scales_outside_the_trained_range_are_said_to_extrapolate(
    tiny_lora_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _range_student(tmp_path, tiny_lora_dir)
    with caplog.at_level("WARNING"):
        resolve(_config(folder, tmp_path, guidance_scales=[2.0, 4.0, 12.0]))
    warned = [r.getMessage() for r in caplog.records if "outside the range" in r.getMessage()]
    assert len(warned) == 1 and "12 lie outside the range the student was trained on (2-8)" in warned[0]


def test_a_fixed_w_student_is_labelled_with_its_trained_scale(tiny_lora_dir: Path, tmp_path: Path) -> None:
    from sd_distill.eval.scales import trained_scale

    folder = _lora_with(tmp_path, tiny_lora_dir, guidance_scale=4.0)
    res = resolve(_config(folder, tmp_path, guidance_scale=6.0, guidance_scales=[4.0, 6.0]))
    assert res.guidance_scale == 6.0 and trained_scale(res) == 4.0


def test_an_out_dir_inside_the_student_folder_is_refused(tiny_lora_dir: Path, tmp_path: Path) -> None:
    folder = _lora_with(tmp_path, tiny_lora_dir)
    for out in (folder, folder / "compare"):
        config = CompareConfig(ft_model=str(folder), out_dir=str(out), prompts=["a cat"])
        with pytest.raises(CompareError, match="is inside --ft_model"):
            resolve(config)
    assert not (folder / "compare").exists()


def test_a_prompts_file_saved_with_a_bom_reads_its_first_line_as_written(tmp_path: Path) -> None:
    from sd_distill.eval.prompts import read_prompts_file
    from sd_distill.train.prompts import read_prompt_lines

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeff# a comment\na cat\n".encode())  # Windows Notepad's UTF-8
    assert read_prompts_file(path) == ["a cat"] and read_prompt_lines(path) == ["a cat"]


def test_a_fused_unet_that_does_not_fit_the_base_is_one_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from sd_distill.eval.compare import run

    fused = Path(shutil.copytree(tiny_model_dir, tmp_path / "fused"))
    unet_config = fused / "unet" / "config.json"
    saved = json.loads(unet_config.read_text())
    unet_config.write_text(json.dumps({**saved, "sample_size": saved["sample_size"] * 2}))  # another native size
    config = CompareConfig(
        ft_model=str(fused), b_model=str(tiny_model_dir), out_dir=str(tmp_path / "o"), prompts=["a cat"],
        num_inference_steps=1, device="cpu",
    )  # fmt: skip
    with pytest.raises(CompareError, match=r"does not fit the base .*sample_size"):
        run(config)
    assert not (tmp_path / "o").exists()


def test_a_recorded_relative_base_that_is_not_here_says_where_it_was_relative_to(
    tiny_lora_dir: Path, tmp_path: Path
) -> None:
    from sd_distill.eval.compare import run

    folder = _lora_with(tmp_path, tiny_lora_dir, pretrained_model_name_or_path="models/elsewhere")
    with pytest.raises(CompareError, match="relative to where training ran; pass --b_model") as err:
        run(_config(folder, tmp_path, num_inference_steps=1, device="cpu"))
    assert "\n" not in str(err.value)


def test_a_rerun_with_fewer_prompts_leaves_only_its_own_images(tiny_lora_dir: Path, tmp_path: Path) -> None:
    from sd_distill.eval.compare import run

    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    two = CompareConfig(
        ft_model=str(tiny_lora_dir), out_dir=str(out), prompts=["a cat", "a dog"], num_inference_steps=1
    )
    run(two)
    first = {str(p.relative_to(out)) for p in out.rglob("*.png")}
    report = run(CompareConfig(**{**two.__dict__, "prompts": ["a cat"]}))
    now = {str(p.relative_to(out)) for p in out.rglob("*.png")}
    assert now < first and now == {"grid.png", *(f for e in report["images"] for f in e["files"].values())}
    assert (out / "notes.txt").read_text() == "mine"
    assert set(json.loads((out / MANIFEST).read_text())["files"]) == {
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
    } - {"notes.txt", MANIFEST}


def test_the_half_files_of_a_killed_comparison_are_removed_by_the_next(tiny_lora_dir: Path, tmp_path: Path) -> None:
    from sd_distill.eval.compare import run

    out = tmp_path / "o"
    config = CompareConfig(ft_model=str(tiny_lora_dir), out_dir=str(out), prompts=["a cat"], num_inference_steps=1)
    run(config)
    image = next((out / "distilled").glob("*.png"))
    half = [out / ".grid.png.tmp-999999999", image.with_name(f".{image.name}.tmp-999999998")]  # writers dead
    for path in half:
        path.write_bytes(b"half a file")
    (out / "notes.txt.tmp-999999997").write_text("a user's")  # not a name of ours: left alone
    run(config)
    assert not any(p.exists() for p in half) and (out / "notes.txt.tmp-999999997").is_file()


# A comparison that does not finish (killed, a full disk, a scorer that raises) over an earlier one's
# folder: whatever it leaves, a report there (report.json, report.md, grid.png, the curve) shows the
# images beside it, never the earlier run's images or a mix of both runs.
REPORTS = ("report.json", "report.md", "grid.png", "guidance_curve.png")


def _files_of(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file() and ".tmp-" not in p.name}


def _assert_reports_show_their_images(out: Path, before: dict[str, bytes]) -> None:
    """No report of the earlier run (its files: ``before``) beside an image of this one, and no report of
    this run beside an image of the earlier one (the rerun uses another seed: every image differs)."""
    now = _files_of(out)
    earlier = {f for f, data in now.items() if before.get(f) == data}
    images = [f for f in now if "/" in f and f.endswith(".png")]
    reports = [f for f in REPORTS if f in now]
    if any(f not in earlier for f in images):
        assert not [f for f in reports if f in earlier], "the earlier run's report beside new images"
    if any(f not in earlier for f in reports):
        assert not [f for f in images if f in earlier], "a new report beside the earlier run's images"
    if "report.json" in now:  # it names exactly the images beside it
        named = {f for e in json.loads(now["report.json"])["images"] for f in e["files"].values()}
        assert named == set(images)


@pytest.fixture(scope="module")
def finished(tiny_lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[CompareConfig, Path]:
    """A finished comparison of 2 prompts (seed 1): the earlier run that each rerun below starts from."""
    from sd_distill.eval.compare import run

    out = tmp_path_factory.mktemp("finished") / "o"
    config = CompareConfig(
        ft_model=str(tiny_lora_dir), out_dir=str(out), prompts=["a cat", "a dog"], num_inference_steps=1, seed=1
    )
    run(config)
    return config, out


def _fill_disk(monkeypatch: pytest.MonkeyPatch, module: object, when: Callable[[Path], bool]) -> None:
    """``module``'s atomic writes fail as on a full disk from the first file ``when`` picks on."""
    real = module.write_atomic  # type: ignore[attr-defined]
    full = []

    def write(path: Path, write_file: Callable[[Path], object]) -> None:
        if full or when(path):
            full.append(path)

            def write_file(tmp: Path) -> None:
                tmp.write_bytes(b"half")
                raise OSError(errno.ENOSPC, "No space left on device")

        real(path, write_file)

    monkeypatch.setattr(module, "write_atomic", write)


def _nth_image(n: int) -> Callable[[Path], bool]:
    """Picks the ``n``-th image PNG written, and every file after it."""
    images: list[Path] = []

    def when(path: Path) -> bool:
        if path.suffix == ".png" and path.name != "grid.png":
            images.append(path)
        return len(images) >= n

    return when


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("prompts", [["a cat", "a dog"], ["a cat"]], ids=["same prompts", "fewer prompts"])
@pytest.mark.parametrize("failure", ["disk full at the second image", "scorer raises", "disk full at report.json"])
def test_a_rerun_that_does_not_finish_leaves_no_report_of_other_images(
    finished: tuple[CompareConfig, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str, prompts: list
) -> None:
    import shutil

    import sd_distill.eval.compare as compare
    import sd_distill.eval.report as report

    config, earlier = finished
    out = Path(shutil.copytree(earlier, tmp_path / "o"))
    before = _files_of(out)
    if failure == "scorer raises":
        monkeypatch.setattr(compare, "score", Mock(side_effect=RuntimeError("scorer broke")))
    else:
        _fill_disk(monkeypatch, report, _nth_image(2) if "image" in failure else lambda p: p.name == "report.json")
    rerun = CompareConfig(**{**config.__dict__, "out_dir": str(out), "prompts": prompts, "seed": 2})
    with pytest.raises((CompareError, RuntimeError), match="no space left|scorer broke"):
        compare.run(rerun)
    assert _files_of(out) != before  # it got as far as writing something
    _assert_reports_show_their_images(out, before)
    monkeypatch.undo()
    compare.run(rerun)  # the next run finishes the folder
    _assert_reports_show_their_images(out, before)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


@pytest.mark.usefixtures("one_thread")
def test_a_rerun_without_scales_does_not_leave_the_earlier_guidance_curve(
    tiny_lora_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sd_distill.eval.compare as compare
    import sd_distill.eval.report as report

    out = tmp_path / "o"
    scales = CompareConfig(
        ft_model=str(tiny_lora_dir), out_dir=str(out), prompts=["a cat"], num_inference_steps=1, seed=1,
        guidance_scales=[2.0, 7.5],
    )  # fmt: skip
    compare.run(scales)
    before = _files_of(out)
    assert "guidance_curve.png" in before
    _fill_disk(monkeypatch, report, _nth_image(2))
    with pytest.raises(CompareError, match="no space left"):
        compare.run(CompareConfig(**{**scales.__dict__, "guidance_scales": None, "seed": 2}))
    _assert_reports_show_their_images(out, before)


def test_a_rerun_killed_after_its_first_image_leaves_no_report_of_other_images(
    finished: tuple[CompareConfig, Path], tmp_path: Path
) -> None:
    """kill -9 for real: nothing of the comparison runs after it."""
    import shutil
    import subprocess
    import sys

    from helpers import subprocess_env

    config, earlier = finished
    out = Path(shutil.copytree(earlier, tmp_path / "o"))
    before = _files_of(out)
    rerun = {**config.__dict__, "out_dir": str(out), "seed": 2}
    child = f"""
import os, signal
import sd_distill.eval.report as report
from sd_distill.eval.compare import CompareConfig, run

real, written = report.write_atomic, []

def write(path, write_file):
    if len(written) == 1:  # the first new image is in place
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, write_file)
    written.append(path)

report.write_atomic = write
run(CompareConfig(**{rerun!r}))
"""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", child], env=subprocess_env(PYTHONPATH=str(repo)), capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert _files_of(out) != before
    _assert_reports_show_their_images(out, before)
