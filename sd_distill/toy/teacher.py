"""Train the shipped toy teacher (models/toy-sd) on the synthetic set, reproducibly, on one CPU thread.

Stages (read top to bottom):
  1. tokenizer: SD's CLIP BPE vocabulary (49,408 tokens), built from ``bpe_simple_vocab_16e6.txt.gz``
     (inside the open_clip_torch wheel; fetch it without installing: see --clip_bpe);
  2. VAE: a 2-block AutoencoderKL with *set* weights (no training): 32x32x3 images <-> 16x16x4
     latents that are the 2x2-average-pooled image (see ``fixed_vae``);
  3. UNet + text encoder, trained together (from scratch, or from --init_from) on cached latents with caption dropout
     (so classifier-free guidance works), v-prediction on a zero-terminal-SNR schedule, half of each
     batch at high noise, and an EMA of the weights;
  4. save the EMA pipeline (safetensors) and score held-out prompts with and without guidance.

The shipped model is two runs of this script (models/toy-sd/README.md has the times): stage 1 with
the defaults (clean captions), stage 2 from stage 1's folder on captions that often misname one
attribute, so that without guidance the teacher draws those mistakes and guidance matters:
    pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc
    BPE=/tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl
    OMP_NUM_THREADS=1 python scripts/train_toy_teacher.py --clip_bpe $BPE --output_dir /tmp/toy-clean \\
        --work_dir /tmp/toy-clean-work
    OMP_NUM_THREADS=1 python scripts/train_toy_teacher.py --clip_bpe $BPE --init_from /tmp/toy-clean \\
        --caption_noise 0.7 --unet_steps 500 --lr 1e-3 --eval_every 250
(or ``--tokenizer_dir models/toy-sd/tokenizer`` to reuse the shipped tokenizer instead of the wheel).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import strict_json
from .checker import adherence, pipeline_adherence
from .synthetic import held_out_prompts, make_dataset
from .tokenizer import compact_tokenizer, load_tokenizer
from .vae import LATENT_CHANNELS, fixed_vae

log = logging.getLogger("train_toy_teacher")

TEXT_DIM = 32  # CLIP hidden size; small because the 49,408-row embedding dominates the file size
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# SD's betas leave ~7 % of the image in x_T. On flat-colour scenes the network then reads background and
# layout off the *noise* (a 16x16 mean is precise even at that SNR) and ignores the caption, which pure
# noise at sampling time cannot supply. Zero terminal SNR (Lin et al. 2024) removes that shortcut; it
# needs v-prediction, and "trailing" spacing so sampling starts at t = 999.
ZERO_SNR = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="models/toy-sd", help="where the pipeline is saved")
    p.add_argument("--work_dir", default="outputs/toy-teacher", help="tokenizer source files and report.json")
    p.add_argument("--clip_bpe", help="bpe_simple_vocab_16e6.txt.gz, or the open_clip_torch wheel holding it")
    p.add_argument("--tokenizer_dir", help="instead of --clip_bpe: an existing CLIP tokenizer folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--n_images", type=int, default=16384, help="synthetic training images (seed --seed)")
    p.add_argument("--unet_steps", type=int, default=3000)
    p.add_argument(
        "--unet_levels",
        type=int,
        choices=(3, 4),
        default=4,
        help="resolution levels: 4 goes down to 2x2, where each cell is a quadrant",
    )
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument(
        "--high_noise_share",
        type=float,
        default=0.5,
        help="share of each batch drawn from the noisiest 40%% of timesteps, where layout is decided",
    )
    p.add_argument(
        "--text_film",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also feed a pooled caption embedding into every ResNet (addition_embed_type='text', "
        "scale-shift): colour and position were learnt ~2x sooner with it",
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=50)
    p.add_argument("--caption_dropout", type=float, default=0.12, help="share of empty captions")
    p.add_argument(
        "--caption_noise",
        type=float,
        default=0.0,
        help="share of training captions that name one attribute wrongly (sd_distill.toy.synthetic.make_dataset); "
        "the shipped model's second stage used 0.7",
    )
    p.add_argument("--init_from", help="start the UNet and text encoder from this saved pipeline (a second stage)")
    p.add_argument(
        "--snapshot_evals",
        action="store_true",
        help="also save the EMA pipeline at every evaluation, to <work_dir>/step-<N>",
    )
    p.add_argument("--ema_decay", type=float, default=0.995)
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--eval_steps", type=int, default=20, help="DDIM steps for the adherence evaluation")
    p.add_argument(
        "--eval_images_per_prompt",
        type=int,
        default=1,
        help="images per held-out prompt in the evaluations during training and at the end",
    )
    return p.parse_args(argv)


# --- 1. tokenizer: sd_distill.toy.tokenizer; 2. VAE: sd_distill.toy.vae ------------------------------


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(pixels[i : i + batch]).latent_dist.mean for i in range(0, len(pixels), batch)])


@torch.no_grad()
def vae_reconstruction_adherence(vae, pixels: torch.Tensor, captions: list[str], n: int = 512) -> float:
    recon = vae.decode(encode_all(vae, pixels[:n])).sample
    images = ((recon.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return adherence(list(images), captions[:n]).score


# --- 3. UNet + text encoder ---------------------------------------------------------------------


def build_unet(levels: int = 4, text_film: bool = False):
    from diffusers import UNet2DConditionModel

    # Cross-attention only at 8x8 and below: over 256 positions it costs more than it helps. The
    # UNet has no position input but zero padding; at 2x2 (levels=4) each cell knows its quadrant at
    # once, which is what "in the top left" needs.
    cross = levels - 1
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32,) + (64,) * cross,  # 16x16 -> 8x8 -> 4x4 (-> 2x2)
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * cross,
        up_block_types=("CrossAttnUpBlock2D",) * cross + ("UpBlock2D",),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,  # diffusers' name for the number of heads here
        norm_num_groups=8,
        **(
            dict(addition_embed_type="text", addition_embed_type_num_heads=4, resnet_time_scale_shift="scale_shift")
            if text_film
            else {}
        ),
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=4 * TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=TEXT_DIM,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_pipeline(unet, vae, text_encoder, tokenizer):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # SD's betas, rescaled to zero terminal SNR (see ZERO_SNR).
    scheduler = DDIMScheduler(**SD_BETAS, **ZERO_SNR, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
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
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate(args: argparse.Namespace, pipe, scales: tuple[float, ...]) -> dict[str, dict]:
    out = {}
    for w in scales:
        r = pipeline_adherence(
            pipe,
            held_out_prompts(),
            guidance_scale=w,
            num_inference_steps=args.eval_steps,
            images_per_prompt=args.eval_images_per_prompt,
            seed=args.seed,
        )
        out[f"w={w:g}"] = {"adherence": r.score, "per_attribute": r.per_attribute, "n": r.n}
    return out


def train_unet(args, latents: torch.Tensor, caption_ids: torch.Tensor, tokenizer, vae):
    """``latents`` [N, 4, 16, 16] (scaled), ``caption_ids`` [N, 77]; returns EMA (unet, text_encoder)."""
    from diffusers import DDPMScheduler

    if args.init_from:  # a second stage: go on from a saved pipeline (its UNet layout wins over the flags)
        from diffusers import UNet2DConditionModel
        from diffusers.configuration_utils import FrozenDict
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(Path(args.init_from) / "unet")
        # Keep the source path out of the saved config.
        unet._internal_dict = FrozenDict({k: v for k, v in unet.config.items() if k != "_name_or_path"})
        text_encoder = CLIPTextModel.from_pretrained(Path(args.init_from) / "text_encoder")
    else:
        unet, text_encoder = build_unet(args.unet_levels, args.text_film), build_text_encoder(tokenizer)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_params = list(ema_unet.parameters()) + list(ema_te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    noise_sched = DDPMScheduler(**SD_BETAS, **ZERO_SNR)
    empty_ids = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids  # [1, 77]
    gen = torch.Generator().manual_seed(args.seed + 2)
    history = []
    t0 = time.time()
    for step in range(1, args.unet_steps + 1):
        warm = min(1.0, step / args.warmup_steps)
        lr = args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.unet_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(latents), (args.batch_size,), generator=gen)
        x0, ids = latents[idx], caption_ids[idx].clone()  # [B, 4, 16, 16], [B, 77]
        drop = torch.rand(args.batch_size, generator=gen) < args.caption_dropout
        ids[drop] = empty_ids
        noise = torch.randn(x0.shape, generator=gen)
        n_t = noise_sched.config.num_train_timesteps
        t = torch.randint(0, n_t, (args.batch_size,), generator=gen)
        high = torch.rand(args.batch_size, generator=gen) < args.high_noise_share
        t[high] = torch.randint(int(0.6 * n_t), n_t, (int(high.sum()),), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        cond = text_encoder(ids)[0]  # [B, 77, 32]; the pipeline also uses last_hidden_state, no mask
        pred = unet(xt, t, cond).sample
        # Plain v-MSE: min-SNR weighting would zero the t = T term, the step that decides the layout.
        loss = F.mse_loss(pred, noise_sched.get_velocity(x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        if step % 100 == 0 or step == 1:
            log.info("unet %d/%d loss %.4f lr %.2e (%.0fs)", step, args.unet_steps, loss.item(), lr, time.time() - t0)
        if (Path(args.work_dir) / "STOP").exists():  # graceful early stop: save what we have
            log.info("STOP file found; ending training at step %d", step)
            break
        if step % args.eval_every == 0 and step < args.unet_steps:
            pipe = build_pipeline(ema_unet.eval(), vae, ema_te.eval(), tokenizer)
            scores = evaluate(args, pipe, (1.0, args.guidance_scale))
            history.append({"step": step, "seconds": time.time() - t0, **scores})
            log.info(
                "eval step %d: %s",
                step,
                {
                    k: (round(v["adherence"], 3), {a: round(x, 2) for a, x in v["per_attribute"].items()})
                    for k, v in scores.items()
                },
            )
            if args.snapshot_evals:
                pipe.save_pretrained(Path(args.work_dir) / f"step-{step}", safe_serialization=True)
    return ema_unet.eval(), ema_te.eval(), history, time.time() - t0


# --- 4. the recipe ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    tokenizer = load_tokenizer(args)
    images, captions = make_dataset(args.n_images, args.seed, caption_noise=args.caption_noise)
    pixels = to_tensor(images)  # [N, 3, 32, 32]

    vae = fixed_vae()  # nothing to train: its reconstructions bound what the teacher can score
    # Scored against the true captions: the bound on what any teacher built on this VAE can read back.
    true_captions = make_dataset(args.n_images, args.seed)[1] if args.caption_noise > 0 else captions
    vae_score = vae_reconstruction_adherence(vae, pixels, true_captions)
    log.info("VAE reconstruction adherence %.3f", vae_score)

    raw = encode_all(vae, pixels)  # [N, 4, 16, 16]
    scaling_factor = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = raw * scaling_factor
    log.info("latent std %.3f -> scaling_factor %.4f", raw.std().item(), scaling_factor)

    # Only a few hundred distinct captions: tokenize each once.
    uniq = sorted(set(captions))
    uniq_ids = tokenizer(uniq, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    pos = {c: i for i, c in enumerate(uniq)}
    caption_ids = uniq_ids[torch.tensor([pos[c] for c in captions])]

    torch.manual_seed(args.seed)
    unet, text_encoder, history, unet_seconds = train_unet(args, latents, caption_ids, tokenizer, vae)
    pipe = build_pipeline(unet, vae, text_encoder, tokenizer)
    pipe.save_pretrained(args.output_dir, safe_serialization=True)
    compact_tokenizer(Path(args.output_dir) / "tokenizer")

    final = evaluate(args, pipe, (1.0, 3.0, args.guidance_scale))
    report = {
        "args": vars(args),
        "unet_seconds": unet_seconds,
        "total_seconds": time.time() - t_start,
        "vae_reconstruction_adherence": vae_score,
        "scaling_factor": scaling_factor,
        "params": {
            name: sum(p.numel() for p in m.parameters())
            for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
        },
        "history": history,
        "final": final,
    }
    (work / "report.json").write_text(strict_json(report, indent=2))
    log.info("final held-out adherence: %s", {k: round(v["adherence"], 3) for k, v in final.items()})
    log.info("saved %s; report in %s", args.output_dir, work / "report.json")


if __name__ == "__main__":
    main()
