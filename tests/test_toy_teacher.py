"""The shipped toy teacher (models/toy-sd) loads with stock diffusers and guidance improves adherence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd_distill.toy.checker import pipeline_adherence
from sd_distill.toy.synthetic import held_out_prompts

TOY_SD = Path(__file__).resolve().parents[1] / "models" / "toy-sd"


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_SD)  # stock loader, offline (conftest)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_folder_is_small_safetensors_with_a_model_card() -> None:
    files = [p for p in TOY_SD.rglob("*") if p.is_file()]
    assert (TOY_SD / "README.md").exists()
    weights = [p for p in files if p.suffix in {".safetensors", ".bin", ".pt", ".ckpt"}]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    assert all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20


def test_tokenizer_is_sd_clip_vocabulary(toy_pipe) -> None:
    tok = toy_pipe.tokenizer
    assert len(tok) == 49408 and tok.model_max_length == 77
    # SD's CLIP ids: <|startoftext|> a red circle <|endoftext|>
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]


def test_generates_a_32px_image(toy_pipe) -> None:
    out = toy_pipe(
        "a large red circle in the center on a white background",
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    image = out.images[0]
    assert image.shape == (32, 32, 3)
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05


@pytest.fixture(scope="module")
def held_out_reports(toy_pipe):
    """Held-out adherence with guidance 7.5 and without (1): the model card's protocol (4 images per prompt)."""
    prompts = held_out_prompts()
    kwargs = dict(num_inference_steps=20, images_per_prompt=4, seed=0)
    guided = pipeline_adherence(toy_pipe, prompts, guidance_scale=7.5, **kwargs)
    plain = pipeline_adherence(toy_pipe, prompts, guidance_scale=1.0, **kwargs)
    return guided, plain


def test_guided_teacher_follows_every_attribute_of_unseen_prompts(held_out_reports) -> None:
    # Ignoring the caption would score ~0.25 on colour, 0.5 on size, 0.2 on position, 0.33 on
    # background and shape.
    guided, _ = held_out_reports
    for attribute, score in guided.per_attribute.items():
        assert score >= 0.85, (attribute, guided)


def test_guidance_reaches_the_issue_target(held_out_reports) -> None:
    """Issue 5: >= 0.8 with guidance and >= 0.2 above guidance 1 (model card: 0.83 against 0.47)."""
    guided, plain = held_out_reports
    assert guided.score >= 0.8, guided
    assert guided.score >= plain.score + 0.2, (guided, plain)


def test_unguided_teacher_reproduces_its_caption_noise_but_stays_on_topic(held_out_reports) -> None:
    # Trained last on captions that misname one attribute 70 % of the time: without guidance each
    # attribute is mostly right, but all five together often are not.
    _, plain = held_out_reports
    assert all(score >= 0.6 for score in plain.per_attribute.values()), plain
    assert plain.score <= 0.7, plain


def test_vae_latent_is_the_pooled_image(toy_pipe) -> None:
    """The fixed-function VAE: latent = 2x2-average-pooled image, decode = nearest upsample."""
    import numpy as np

    from sd_distill.toy.synthetic import make_dataset

    images, _ = make_dataset(4, seed=7)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [4, 3, 32, 32]
    with torch.no_grad():
        z = toy_pipe.vae.encode(x).latent_dist.mean  # [4, 4, 16, 16]
        pooled = torch.nn.functional.avg_pool2d(x, 2)
        assert torch.allclose(z[:, :3], pooled, atol=0.02)
        recon = toy_pipe.vae.decode(z).sample
    assert torch.allclose(recon, torch.nn.functional.interpolate(pooled, scale_factor=2), atol=0.03)
