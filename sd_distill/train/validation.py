"""Validation images during training: the student at guidance 1 beside the teacher at guidance w."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from ..conditioning import UnconditionedView
from ..files import write_error
from ..lora import adapter_disabled
from ..models import Components
from .collective import main_process_writes
from .config import TrainConfig

logger = logging.getLogger(__name__)


@torch.no_grad()
def run_validation(
    accelerator: Any,
    model: Any,
    separate_teacher: Any,
    components: Components,
    config: TrainConfig,
    step: int,
    weight_dtype: torch.dtype,
    name: str = "",
) -> None:
    """Student at guidance 1 and teacher at guidance w, same seed per prompt; all ranks take part
    (ZeRO-3 gathers parameters collectively), the main process writes the images. ``name``: what
    follows ``step-<step>`` in their folder and the tracker's tag (``mean``: the averaged student)."""
    with encoders_on(components, accelerator.device):
        images = _render(accelerator, model, separate_teacher, components, config, weight_dtype)
    # a full disk, or a tracker that fails: every rank stops with one line, none waits for the main one
    main_process_writes(accelerator, lambda: _write(accelerator, images, config, step, name))


@contextmanager
def encoders_on(components: Components, device: torch.device) -> Iterator[None]:
    """The VAE and text encoder on ``device`` inside; parked in CPU memory again afterwards if they
    were parked (``components.encoders_parked``), and left where they are otherwise."""
    parked = components.encoders_parked
    if parked:
        components.vae.to(device), components.text_encoder.to(device)
    try:
        yield
    finally:
        if parked:
            components.vae.to("cpu"), components.text_encoder.to("cpu")


def student_scale(config: TrainConfig) -> float:
    """A w-conditioned student is sampled at ``w`` (told it, one pass); a fixed-w one at 1 (one pass)."""
    return config.guidance_scale if config.conditioned_on_guidance else 1.0


def _pipeline(components: Components, unet: Any) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(
    accelerator: Any,
    model: Any,
    separate_teacher: Any,
    components: Components,
    config: TrainConfig,
    weight_dtype: torch.dtype,
) -> dict[str, list[Any]]:
    model.eval()
    pipe = _pipeline(components, model)
    # the teacher: a second UNet, or the student with its adapter off, seen without its cond_proj
    shared = separate_teacher is None
    teacher_pipe = _pipeline(components, UnconditionedView(model) if shared else separate_teacher)
    images: dict[str, list[Any]] = {"student": [], "teacher": []}
    seed = config.seed if config.seed is not None else 0
    kw = {"num_inference_steps": config.num_validation_inference_steps, "output_type": "pil"}
    w = config.guidance_scale
    for prompt in config.prompts_for_validation:
        with torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            gen = torch.Generator(accelerator.device).manual_seed(seed)
            images["student"].append(pipe(prompt, guidance_scale=student_scale(config), generator=gen, **kw).images[0])
            gen = torch.Generator(accelerator.device).manual_seed(seed)
            with adapter_disabled(model) if shared else nullcontext():
                images["teacher"].append(teacher_pipe(prompt, guidance_scale=w, generator=gen, **kw).images[0])
    model.train()
    return images


def _write(accelerator: Any, images: dict[str, list[Any]], config: TrainConfig, step: int, name: str) -> None:
    """The images and the tracker's copy (:class:`OutputWriteError` when the disk refused them)."""
    import numpy as np

    folder = Path(config.output_dir) / "validation" / "-".join(filter(None, (f"step-{step}", name)))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(len(config.prompts_for_validation)):
            images["student"][i].save(folder / f"{i:02d}-student-w{student_scale(config):g}.png")
            images["teacher"][i].save(folder / f"{i:02d}-teacher-w{config.guidance_scale:g}.png")
        (folder / "prompts.json").write_text(json.dumps(config.prompts_for_validation, indent=2))
    except OSError as err:  # the checkpoints are intact
        raise write_error(err, folder) from None
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for side, imgs in images.items():
                stacked = np.stack([np.asarray(im) for im in imgs])
                tag = "/".join(filter(None, ("validation", name, side)))
                tracker.writer.add_images(tag, stacked, step, dataformats="NHWC")
    logger.info("validation images for step %d in %s", step, folder)
