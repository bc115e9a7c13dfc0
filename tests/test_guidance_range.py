"""One LoRA for every guidance scale: a run with --guidance_scale_range trains, checkpoints and
resumes the LoRA and cond_proj together, and its outputs load in stock diffusers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import reset_accelerate_state, run_training, subprocess_env, train_args, write_image_folder
from sd_distill.conditioning import guidance_projection, load_student, student_timestep_cond
from sd_distill.constants import GUIDANCE_PROJ_WEIGHTS_NAME, LORA_WEIGHTS_NAME

ROOT = Path(__file__).resolve().parents[1]
RANGE = ("--guidance_scale_range", "2", "8", "--guidance_embedding_dim", "32", "--learning_rate", "1e-2")
pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(folder / LORA_WEIGHTS_NAME)), **load_file(str(folder / GUIDANCE_PROJ_WEIGHTS_NAME))}


def test_a_range_run_trains_cond_proj_and_saves_it_beside_the_lora(tiny_model_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    data, out = write_image_folder(tmp_path / "data", n=4), tmp_path / "out"
    argv = train_args(
        tiny_model_dir,
        data,
        out,
        *RANGE,
        "--validation_steps",
        "4",
        "--default_prompt",
        "a red circle",
        "--num_validation_inference_steps",
        "2",
        steps=4,
    )
    _, training = run_training(argv)
    for folder in (out, out / "checkpoint-2"):
        assert (folder / GUIDANCE_PROJ_WEIGHTS_NAME).is_file() and (folder / LORA_WEIGHTS_NAME).is_file()
    assert _weights(out)["time_embedding.cond_proj.weight"].abs().sum() > 0  # it left its zero start
    assert (out / "validation" / "step-4" / "00-student-w7.5.png").is_file()

    pipe = load_student(StableDiffusionPipeline.from_pretrained(tiny_model_dir), out)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(1))
    cond = student_timestep_cond(torch.tensor([3.0, 6.0]), 32, x)
    with torch.no_grad():
        trained = training.model(x, torch.tensor([100, 800]), emb, timestep_cond=cond).sample
        loaded = pipe.unet(x, torch.tensor([100, 800]), emb, timestep_cond=cond).sample
    assert torch.allclose(trained, loaded, atol=1e-5)
    assert guidance_projection(pipe.unet) is not None and pipe.unet.config.time_cond_proj_dim == 32


def test_a_student_trained_on_the_smooth_features_samples_the_same_from_the_stock_embedding(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    from sd_distill.conditioning import smooth_features

    data, out = write_image_folder(tmp_path / "data", n=4), tmp_path / "out"
    _, training = run_training(
        train_args(tiny_model_dir, data, out, *RANGE, "--guidance_embedding_features", "smooth", steps=4)
    )
    weight = _weights(out)["time_embedding.cond_proj.weight"]  # [C, 32]
    smooth = smooth_features(32).bool()
    assert 0 < smooth.sum() < 32
    assert weight[:, smooth].abs().sum() > 0 and torch.equal(weight[:, ~smooth], torch.zeros_like(weight[:, ~smooth]))

    pipe = load_student(StableDiffusionPipeline.from_pretrained(tiny_model_dir), out)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(1))
    t, w = torch.tensor([100, 800]), torch.tensor([3.0, 6.0])
    with torch.no_grad():
        trained = training.model(x, t, emb, timestep_cond=student_timestep_cond(w, 32, x, smooth_only=True)).sample
        stock = pipe.unet(x, t, emb, timestep_cond=student_timestep_cond(w, 32, x)).sample  # what the pipeline passes
    assert torch.allclose(trained, stock, atol=1e-5)


def test_a_range_run_whose_lora_leaves_out_the_time_embedding_says_so(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_image_folder(tmp_path / "data", n=4)
    argv = train_args(tiny_model_dir, data, tmp_path / "out", *RANGE, "--lora_target_modules", "to_q", steps=1)
    with caplog.at_level("WARNING"):
        run_training(argv)
    assert any("time embedding without LoRA" in r.getMessage() for r in caplog.records)
    trained = load_file(str(tmp_path / "out" / LORA_WEIGHTS_NAME))
    assert not any("time_embedding" in k for k in trained)  # honoured, not changed


def test_a_range_run_resumes_to_the_same_lora_and_cond_proj(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", n=4)
    run_training(train_args(tiny_model_dir, data, tmp_path / "whole", *RANGE, steps=4))
    reset_accelerate_state()
    run_training(train_args(tiny_model_dir, data, tmp_path / "part", *RANGE, steps=2))
    reset_accelerate_state()
    run_training(
        train_args(tiny_model_dir, data, tmp_path / "part", *RANGE, "--resume_from_checkpoint", "latest", steps=4)
    )
    whole, part = _weights(tmp_path / "whole"), _weights(tmp_path / "part")
    assert whole.keys() == part.keys() and all(torch.equal(whole[k], part[k]) for k in whole)


def test_the_fused_export_samples_any_scale_in_one_pass_with_stock_diffusers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    data, fused = write_image_folder(tmp_path / "data", n=4), tmp_path / "fused"
    run_training(
        train_args(tiny_model_dir, data, tmp_path / "out", *RANGE, "--export_fused_pipeline", str(fused), steps=2)
    )
    pipe = StableDiffusionPipeline.from_pretrained(fused)  # stock diffusers from here on
    pipe.set_progress_bar_config(disable=True)
    calls: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    for g in (2.0, 10.0):
        pipe("a red circle", num_inference_steps=3, guidance_scale=g, generator=torch.Generator().manual_seed(0))
    assert calls == [1] * 6 and pipe.unet.config.time_cond_proj_dim == 32


def test_two_process_zero2_range_run_resumes_bit_identically(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", n=8)

    def launch(out: Path, steps: int, *extra: str) -> None:
        cmd = [
            str(Path(sys.executable).with_name("accelerate")),
            "launch",
            "--config_file",
            str(ROOT / "accelerate_configs" / "cpu_2proc_zero2.yaml"),
            "--main_process_port",
            "0",
            str(ROOT / "train_sd_distil_lora.py"),
            *train_args(tiny_model_dir, data, out, *RANGE, *extra, steps=steps),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=subprocess_env(), cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(tmp_path / "whole", 4)
    launch(tmp_path / "part", 2)
    launch(tmp_path / "part", 4, "--resume_from_checkpoint", "latest")
    whole, part = _weights(tmp_path / "whole"), _weights(tmp_path / "part")
    assert torch.equal(whole["time_embedding.cond_proj.weight"], part["time_embedding.cond_proj.weight"])
    assert all(torch.equal(whole[k], part[k]) for k in whole)
