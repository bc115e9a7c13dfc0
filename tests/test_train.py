"""In-process training on the tiny pipeline: what changes, what must not, and the adapter's state."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import reset_accelerate_state, run_training, train_args, write_image_folder
from sd_distill.lora import adapter_is_enabled


def _run_capturing(argv: list[str]) -> tuple[Any, Any]:
    """Run training in-process; return (stats, components) so tests can inspect the models."""
    stats, training = run_training(argv)
    return stats, training.components


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_training_changes_only_the_lora_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    data = write_image_folder(tmp_path / "data")
    # Record the adapter state at every UNet call: the teacher must see it off, the student on.
    seen: list[bool] = []

    class SpyTarget:  # a target double: the real one, noting the adapter state inside the teacher
        def __init__(self, real: Any, model: Any) -> None:
            self.real, self.model = real, model

        def teacher_prediction(self, states: Any, teacher: Any) -> torch.Tensor:
            @contextmanager
            def spying() -> Iterator[Any]:
                with teacher() as unet:
                    seen.append(adapter_is_enabled(self.model))
                    yield unet

            return self.real.teacher_prediction(states, spying)

        def student_inputs(self, states: Any) -> dict[str, Any]:
            return self.real.student_inputs(states)

    def spy(training: Any) -> None:
        training.target = SpyTarget(training.target, training.model)
        training.model.register_forward_pre_hook(lambda m, a: seen.append(adapter_is_enabled(m)))

    no_cache = ("--no-cache_latents", "--no-cache_text_embeddings")  # the VAE and text encoder run every step
    stats, training = run_training(train_args(tiny_model_dir, data, tmp_path / "out", *no_cache, steps=3), spy)
    comps = training.components

    assert stats.global_step == 3 and all(torch.isfinite(torch.tensor(stats.losses)))
    # per step: spy (adapter off), forward pre-hook of the teacher pass (off), the student pass (on)
    assert seen[:6] == [False, False, True, False, False, True]
    assert adapter_is_enabled(comps.unet)

    base_unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").state_dict()
    trained = comps.unet.state_dict()
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys
    for key, value in trained.items():
        if "lora_" in key:
            continue
        base_key = key.replace(".base_layer", "")
        assert torch.equal(value, base_unet[base_key]), f"frozen UNet weight {key} changed"
    assert any(trained[k].abs().sum() > 0 for k in lora_keys if "lora_B" in k), "LoRA B stayed at its zero init"
    for frozen, cls, sub in ((comps.vae, AutoencoderKL, "vae"), (comps.text_encoder, CLIPTextModel, "text_encoder")):
        fresh = cls.from_pretrained(tiny_model_dir, subfolder=sub).state_dict()
        assert all(torch.equal(v, fresh[k]) for k, v in frozen.state_dict().items()), f"{sub} changed"
    out = tmp_path / "out"
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()
    assert json.loads((out / "sd_distill_config.json").read_text())["guidance_scale"] == 7.5


def test_training_reduces_the_distillation_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", n=4)
    argv = train_args(
        tiny_model_dir,
        data,
        tmp_path / "out",
        "--train_batch_size",
        "4",
        "--learning_rate",
        "1e-2",
        "--lora_rank",
        "8",
        "--checkpointing_steps",
        "1000",
        "--logging_steps",
        "1",
        steps=80,
    )
    stats, _ = _run_capturing(argv)
    first, last = sum(stats.losses[:5]) / 5, sum(stats.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("fixture", ["tiny_vpred_model_dir"])
def test_v_prediction_model_trains_with_min_snr_and_huber(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model: Path = request.getfixturevalue(fixture)
    data = write_image_folder(tmp_path / "data", n=4)
    argv = train_args(
        model,
        data,
        tmp_path / "out",
        "--snr_gamma",
        "5",
        "--loss",
        "huber",
        "--caption_dropout",
        "0.5",
        "--teacher",
        "separate",
        "--gradient_checkpointing",
        steps=2,
    )
    stats, comps = _run_capturing(argv)
    assert comps.prediction_type == "v_prediction"
    assert stats.global_step == 2 and all(torch.isfinite(torch.tensor(stats.losses)))
    from safetensors.torch import load_file

    lora = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    # B starts at zero: non-zero B means gradients reached the adapter through checkpointed blocks
    assert all(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k or "lora.up" in k)
    assert any("lora_B" in k or "lora.up" in k for k in lora)


def test_cached_latents_and_text_give_the_same_first_loss_as_uncached(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_image_folder(tmp_path / "data", n=4)
    # center crop, no flip: the cached crop is then the one the uncached run draws
    common = ("--center_crop", "--checkpointing_steps", "1000")
    plain, _ = _run_capturing(
        train_args(
            tiny_model_dir, data, tmp_path / "a", *common, "--no-cache_latents", "--no-cache_text_embeddings", steps=2
        )
    )
    reset_accelerate_state()
    cached, _ = _run_capturing(
        train_args(
            tiny_model_dir, data, tmp_path / "b", *common, "--no-cache_latents", "--cache_text_embeddings", steps=2
        )
    )
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5)
    assert list((tmp_path / "b" / "cache").glob("text-*.safetensors"))
    reset_accelerate_state()
    latents, _ = _run_capturing(
        train_args(tiny_model_dir, data, tmp_path / "c", *common, "--cache_latents", "--cache_text_embeddings", steps=2)
    )
    assert latents.global_step == 2 and all(torch.isfinite(torch.tensor(latents.losses)))


def test_fused_export_is_a_full_pipeline_matching_the_trained_student(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Stock loading of the LoRA and the fused export both give the UNet that was trained, at its
    alpha / r (here 4: without the adapter metadata both would load it at scale 1)."""
    from diffusers import StableDiffusionPipeline

    data = write_image_folder(tmp_path / "data", n=4)
    out, fused = tmp_path / "out", tmp_path / "fused"
    extra = ("--export_fused_pipeline", str(fused), "--learning_rate", "5e-2", "--lora_rank", "4", "--lora_alpha", "16")
    _, training = run_training(train_args(tiny_model_dir, data, out, *extra, steps=3))
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    base.load_lora_weights(out)
    one_folder = StableDiffusionPipeline.from_pretrained(fused)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = training.model(x, 500, emb).sample
        a, b = base.unet(x, 500, emb).sample, one_folder.unet(x, 500, emb).sample
        plain = StableDiffusionPipeline.from_pretrained(tiny_model_dir).unet(x, 500, emb).sample
    assert torch.allclose(a, trained, atol=1e-5) and torch.allclose(b, trained, atol=1e-5)
    assert not torch.allclose(a, plain, atol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary export left beside it


def test_export_dtype_sets_the_fused_pipelines_stored_precision(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    data, fused = write_image_folder(tmp_path / "data", n=4), tmp_path / "fused"
    run_training(
        train_args(
            tiny_model_dir,
            data,
            tmp_path / "out",
            "--export_fused_pipeline",
            str(fused),
            "--export_dtype",
            "fp16",
            steps=2,
        )
    )
    for weights in (fused / "unet").glob("*.safetensors"):
        with safe_open(str(weights), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_validation_renders_student_and_teacher_and_logs_to_tensorboard(tiny_model_dir: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    data = write_image_folder(tmp_path / "data", n=4)
    out = tmp_path / "out"
    argv = train_args(
        tiny_model_dir,
        data,
        out,
        "--validation_prompts",
        "a red circle",
        "a blue square",
        "--validation_steps",
        "2",
        "--num_validation_inference_steps",
        "2",
        "--report_to",
        "tensorboard",
        steps=2,
    )
    _, comps = _run_capturing(argv)
    folder = out / "validation" / "step-2"
    student, teacher = Image.open(folder / "01-student-w1.png"), Image.open(folder / "01-teacher-w7.5.png")
    assert not np.array_equal(np.asarray(student), np.asarray(teacher))
    assert adapter_is_enabled(comps.unet)
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_small_datasets_are_cached_by_default_and_the_encoders_freed(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sd_distill.train.config import AUTO_CACHE_MAX_ROWS, TrainConfig, resolve_auto_cache

    auto = TrainConfig(train_data_dir="x")
    assert (resolve_auto_cache(auto, 10).cache_latents, resolve_auto_cache(auto, 10).cache_text_embeddings) == (
        True,
        True,
    )
    big = resolve_auto_cache(auto, AUTO_CACHE_MAX_ROWS + 1)
    assert (big.cache_latents, big.cache_text_embeddings) == (False, False)
    flipped = resolve_auto_cache(TrainConfig(train_data_dir="x", random_flip=True), 10)
    assert (flipped.cache_latents, flipped.cache_text_embeddings) == (False, True)  # flips must stay random
    assert resolve_auto_cache(TrainConfig(train_data_dir="x", cache_latents=False), 10).cache_latents is False
    assert resolve_auto_cache(auto, None).cache_text_embeddings is False  # a stream

    data = write_image_folder(tmp_path / "data", n=4)
    stats, comps = _run_capturing(train_args(tiny_model_dir, data, tmp_path / "out", steps=2))
    assert stats.global_step == 2 and list((tmp_path / "out" / "cache").glob("latents-*.safetensors"))
    assert comps.vae is None and comps.text_encoder is None  # nothing in the loop needs them any more
    saved = json.loads((tmp_path / "out" / "sd_distill_config.json").read_text())
    assert saved["cache_latents"] is True and saved["cache_text_embeddings"] is True
