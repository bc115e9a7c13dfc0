"""Tiny Stable Diffusion pipelines built locally: the models the tests (and a first demo) run on.

They have the real component classes and folder layout of a diffusers ``StableDiffusionPipeline``,
so every code path (loading, LoRA, saving, sampling) is the one a real SD checkpoint takes, but they
are random and run in milliseconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# A character-level CLIP BPE vocabulary (no merges): any lowercase prompt tokenizes, and
# different prompts give different token ids, which is all the tests need.
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def write_tiny_tokenizer(folder: Path) -> None:
    """Write ``vocab.json``/``merges.txt`` of a tiny character-level CLIP tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [c + "</w>" for c in letters] + _SPECIAL
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def build_tiny_pipeline(
    folder: str | Path,
    *,
    prediction_type: str = "epsilon",
    seed: int = 0,
    sample_size: int = 16,
    width: int = 1,
) -> Path:
    """Build a complete tiny ``StableDiffusionPipeline`` and ``save_pretrained`` it to ``folder``.

    ``sample_size`` is the UNet's latent size; images are 2x larger (the VAE has one down block).
    ``width`` multiplies the UNet's channels (a wider UNet makes size ratios realistic).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=(8 * width, 16 * width),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
        in_channels=4,
        out_channels=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 2,
    )
    tok_dir = folder / "_tok_src"
    write_tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return folder
