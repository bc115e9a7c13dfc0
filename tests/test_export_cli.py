"""export_fused_pipeline.py: a finished training folder as a pipeline stock diffusers loads alone."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sd_distill.conditioning import load_student, save_guidance_projection
from sd_distill.constants import CONFIG_FILE_NAME
from sd_distill.train.ownership import is_fused_export

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export_fused_pipeline import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DIM = 16


@pytest.fixture()
def range_student(tiny_model_dir: Path, tiny_lora_dir: Path, tmp_path: Path) -> Path:
    """A w-conditioned student folder: the LoRA, a non-zero cond_proj and a config that records the range."""
    folder = tmp_path / "student"
    shutil.copytree(tiny_lora_dir, folder)
    channels = json.loads((tiny_model_dir / "unet" / "config.json").read_text())["block_out_channels"][0]
    save_guidance_projection(torch.randn(channels, DIM, generator=torch.Generator().manual_seed(0)), folder)
    config = json.loads((folder / CONFIG_FILE_NAME).read_text())
    (folder / CONFIG_FILE_NAME).write_text(json.dumps({**config, "guidance_scale_range": [2.0, 8.0]}))
    return folder


def _unet_output(unet: torch.nn.Module, dim: int) -> torch.Tensor:

    g = torch.Generator().manual_seed(3)
    sample = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    cond = torch.randn(1, dim, generator=g)
    with torch.no_grad():
        return unet(sample, 500, encoder_hidden_states=text, timestep_cond=cond).sample


def test_a_range_student_exports_to_what_load_student_samples(
    tiny_model_dir: Path, range_student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "fused"
    assert main(["--student", str(range_student), "--out", str(out)]) == 0
    assert "guidance_scale=g" in capsys.readouterr().out
    assert is_fused_export(out)
    fused = StableDiffusionPipeline.from_pretrained(out)  # stock diffusers, no sd-distill
    assert fused.unet.config.time_cond_proj_dim == DIM
    loaded = load_student(StableDiffusionPipeline.from_pretrained(tiny_model_dir), range_student)
    torch.testing.assert_close(_unet_output(fused.unet, DIM), _unet_output(loaded.unet, DIM), atol=1e-5, rtol=1e-4)


def test_fp16_stores_half_precision_weights(range_student: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "fused16"
    assert main(["--student", str(range_student), "--out", str(out), "--dtype", "fp16"]) == 0
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.unet.config.time_cond_proj_dim == DIM


def test_an_earlier_export_is_replaced_and_a_users_folder_is_not(range_student: Path, tmp_path: Path) -> None:
    out = tmp_path / "fused"
    assert main(["--student", str(range_student), "--out", str(out)]) == 0
    assert main(["--student", str(range_student), "--out", str(out)]) == 0  # an earlier export: replaced
    (out / "README.md").write_text("mine")
    assert main(["--student", str(range_student), "--out", str(out)]) == 2
    assert (out / "README.md").read_text() == "mine"


def _bad_inputs(student: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    unfinished = tmp / "unfinished"
    (unfinished / "checkpoint-2").mkdir(parents=True)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("x")
    (tmp / "a-file").write_text("x")
    moved = tmp / "moved"
    shutil.copytree(student, moved)
    config = json.loads((moved / CONFIG_FILE_NAME).read_text())
    (moved / CONFIG_FILE_NAME).write_text(json.dumps({**config, "pretrained_model_name_or_path": "models/nowhere"}))
    broken = tmp / "broken-base"  # a pipeline folder with its weights missing
    broken.mkdir()
    shutil.copy(
        Path(json.loads((student / CONFIG_FILE_NAME).read_text())["pretrained_model_name_or_path"])
        / "model_index.json",
        broken,
    )
    new = str(tmp / "new")
    return {
        "broken base": (["--student", str(student), "--out", new, "--base", str(broken)], "cannot load the base model"),
        "missing student": (["--student", str(tmp / "none"), "--out", new], "not found"),
        "unfinished run": (["--student", str(unfinished), "--out", new], "checkpoint-2: the run has not finished"),
        "into the student": (["--student", str(student), "--out", str(student)], "is --student or inside/above it"),
        "inside the student": (["--student", str(student), "--out", str(student / "f")], "is --student or inside"),
        "a user's folder": (["--student", str(student), "--out", str(tmp / "mine")], "holds other files"),
        "a file": (["--student", str(student), "--out", str(tmp / "a-file")], "is a file"),
        "recorded base gone": (["--student", str(moved), "--out", new], "is no folder here (recorded by training"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing student",
        "unfinished run",
        "into the student",
        "inside the student",
        "a user's folder",
        "a file",
        "recorded base gone",
        "broken base",
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(
    case: str, range_student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, message = _bad_inputs(range_student, tmp_path)[case]

    def files() -> list[Path]:  # the run lock an export takes is the folder's own (training leaves it too)
        return sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name != ".sd-distill.lock")

    before = files()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]  # beside diffusers' progress bars
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert files() == before


def test_a_base_the_lora_does_not_fit_is_refused(
    range_student: Path, wide_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fused"
    assert main(["--student", str(range_student), "--out", str(out), "--base", str(wide_model_dir)]) == 2
    assert "does not fit the base" in capsys.readouterr().err
    assert not out.exists()


def test_a_student_folder_a_run_is_training_in_is_refused(
    range_student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess

    hold = "import sys, time; from pathlib import Path; from sd_distill.train.rundir import RunLock; "
    hold += "RunLock.acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(range_student)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["--student", str(range_student), "--out", str(tmp_path / "fused")]) == 2
        assert "is in use by a training run (pid" in capsys.readouterr().err
        assert not (tmp_path / "fused").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_fixed_w_student_exports_without_the_guidance_input(
    tiny_lora_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    student, out = shutil.copytree(tiny_lora_dir, tmp_path / "student"), tmp_path / "fused"
    assert main(["--student", str(student), "--out", str(out)]) == 0
    assert "guidance_scale=1)" in capsys.readouterr().out
    assert json.loads((out / "unet" / "config.json").read_text())["time_cond_proj_dim"] is None
