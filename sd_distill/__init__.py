"""sd-distill: distill Stable Diffusion's classifier-free guidance into a LoRA adapter."""

__version__ = "0.1.0"
