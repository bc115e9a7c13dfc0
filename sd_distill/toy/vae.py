"""The toy teacher's VAE: weights set by hand, not trained (32x32x3 images <-> 16x16x4 latents)."""

from __future__ import annotations

import math

import torch

LATENT_CHANNELS = 4
K_CONST = 100.0  # constant carrier channels that pin each GroupNorm's statistics (see fixed_vae)
SILU_SHIFT = 12.0  # SiLU(z) ~ z for z >= 11 (error < 2e-4), so shift the signal there and back


def fixed_vae():
    """A 2-block AutoencoderKL whose weights are *set*, not trained: the latent's channels 0-2 are the
    image average-pooled 2x2 (32x32 -> 16x16, values in [-1, 1]; channel 3 is 0) and the decoder
    upsamples them back (nearest). A trained 8x8 VAE stayed blurry after 10 CPU-minutes (its
    reconstructions scored 0.52 on the checker); this one is exact up to the pooling.

    Every ResNet block and the mid attention is an identity (zero output projection). The only
    nonlinear layers left are each half's final GroupNorm + SiLU; a group holds (s, -s, K, -K), so
    its mean is 0 and its std ~K/sqrt(2) whatever the image, and a shift puts SiLU in its linear range.
    """
    from diffusers import AutoencoderKL

    c = 16  # 4 GroupNorm groups of 4 channels; groups 0-2 carry R, G, B
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(c, c),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=32,
    )
    sigma = K_CONST / math.sqrt(2)
    with torch.no_grad():
        for prm in vae.parameters():
            prm.zero_()

        def carriers(conv, n_in: int) -> None:  # input channel g -> (s, -s, K, -K) in group g
            for g in range(n_in):
                conv.weight[4 * g, g, 1, 1], conv.weight[4 * g + 1, g, 1, 1] = 1.0, -1.0
                conv.bias[4 * g + 2], conv.bias[4 * g + 3] = K_CONST, -K_CONST

        def norm_out(gn, conv_out, n_out: int) -> None:  # GroupNorm -> SiLU -> conv back to s
            gn.weight[:], gn.bias[:] = 0.0, 0.0
            for g in range(n_out):
                gn.weight[4 * g], gn.bias[4 * g] = 1.0, SILU_SHIFT
                conv_out.weight[g, 4 * g, 1, 1], conv_out.bias[g] = sigma, -SILU_SHIFT * sigma

        carriers(vae.encoder.conv_in, 3)
        # Downsample2D pads (0, 1, 0, 1) and convolves 3x3 stride 2: the top-left 2x2 taps average.
        vae.encoder.down_blocks[0].downsamplers[0].conv.weight[range(c), range(c), :2, :2] = 0.25
        norm_out(vae.encoder.conv_norm_out, vae.encoder.conv_out, 3)
        vae.quant_conv.weight[range(LATENT_CHANNELS), range(LATENT_CHANNELS), 0, 0] = 1.0
        vae.quant_conv.bias[LATENT_CHANNELS:] = -14.0  # posterior std e^-7 ~ 1e-3

        vae.post_quant_conv.weight[range(LATENT_CHANNELS), range(LATENT_CHANNELS), 0, 0] = 1.0
        carriers(vae.decoder.conv_in, 3)
        vae.decoder.up_blocks[0].upsamplers[0].conv.weight[range(c), range(c), 1, 1] = 1.0  # after nearest 2x
        norm_out(vae.decoder.conv_norm_out, vae.decoder.conv_out, 3)
        # Norm layers inside the (zeroed) residual branches need a valid scale; their output is unused.
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm) and m not in (vae.encoder.conv_norm_out, vae.decoder.conv_norm_out):
                m.weight.fill_(1.0)
    return vae.eval().requires_grad_(False)
