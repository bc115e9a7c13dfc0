"""What a run leaves in its output folder: the LoRA with its config and model card, the summary, and
optionally a fused pipeline. Each file is written to a temporary sibling and renamed over the old
one, so a failed write (disk full) never leaves a half file over a good one. Which folders a run may
write into at all is :mod:`.ownership`'s question."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..conditioning import StudentWeights, save_student, student_weights
from ..constants import (
    CONFIG_FILE_NAME,
    GUIDANCE_PROJ_WEIGHTS_NAME,
    LORA_WEIGHTS_NAME,
    MODEL_CARD_NAME,
    SUMMARY_FILE_NAME,
)
from ..files import OutputWriteError, strict_json, write_atomically
from ..lora import adapter_metadata
from ..models import torch_dtype
from .averaging import WeightAverage
from .checkpoint import deepspeed_engine
from .collective import main_process_writes
from .config import TrainConfig
from .export import export_fused_pipeline

logger = logging.getLogger(__name__)


def save_final(
    accelerator: Any,
    model: Any,
    config: TrainConfig,
    on_saved: Callable[[], None] | None = None,
    average: WeightAverage | None = None,
) -> None:
    """The adapter in diffusers LoRA format (with its adapter metadata), the config and a model card;
    then ``on_saved()`` and the fused pipeline if asked for. With an ``average`` that holds steps, its
    mean is saved instead of the last step's weights. A failed write raises :class:`OutputWriteError`
    on every rank."""
    averaged = average.count if average is not None else 0
    if averaged:
        weights = average.student_weights(model)
        logger.info("saving the mean of the weights over the last %d steps", averaged)
    else:
        weights = student_weights(model, deepspeed_engine(accelerator))  # collective under DeepSpeed

    def write() -> None:
        _write_final(weights, model, config, averaged)
        if on_saved is not None:
            on_saved()
        if config.export_fused_pipeline:
            _export(config)

    main_process_writes(accelerator, write)


def _export(config: TrainConfig) -> None:
    """The fused export, after the LoRA is saved: a full disk here need not cost the training."""
    out, target = Path(config.output_dir), config.export_fused_pipeline
    try:
        export_fused_pipeline(
            config.pretrained_model_name_or_path,
            out,
            target,
            config.revision,
            config.variant,
            torch_dtype(config.export_dtype),
        )
    except OutputWriteError as err:
        redo = shlex.join(["python", "export_fused_pipeline.py", "--student", str(out), "--out", str(target)])
        dtype = "" if config.export_dtype == "fp32" else f" --dtype {config.export_dtype}"
        raise OutputWriteError(
            f"{err} The student is saved in {out}: `{redo}{dtype}` exports it without training again.", err.no_space
        ) from None


def _write_final(weights: StudentWeights, model: Any, config: TrainConfig, averaged_steps: int = 0) -> None:
    out = Path(config.output_dir)
    save_student(weights, out, adapter_metadata(model))
    write_atomically(out / CONFIG_FILE_NAME, config.to_json())
    write_atomically(out / MODEL_CARD_NAME, model_card(config, averaged_steps))
    logger.info("saved the LoRA adapter to %s", out / LORA_WEIGHTS_NAME)


def write_summary(config: TrainConfig, stats: Any) -> None:
    """``train_summary.json``, strict JSON (a loss that was never measured is ``null``, not ``NaN``)."""
    write_atomically(Path(config.output_dir) / SUMMARY_FILE_NAME, strict_json(asdict(stats), indent=2))


def _averaged(config: TrainConfig, steps: int) -> str:
    if not steps:
        return ""
    if steps == 1:
        return (
            "The weights are the last training step's: the averaging window "
            f"(`--average_last_fraction {config.average_last_fraction:g}`) held that one step only. "
        )
    return (
        f"The weights are the mean of the weights after each of the last {steps} training steps "
        f"(`--average_last_fraction {config.average_last_fraction:g}`). "
    )


def _export_dtype_argument(config: TrainConfig) -> str:
    """What loading an export stored in half precision needs (without it a CPU load mixes dtypes)."""
    names = {"fp16": "float16", "bf16": "bfloat16"}
    return f", torch_dtype=torch.{names[config.export_dtype]}" if config.export_dtype in names else ""


def model_card(config: TrainConfig, averaged_steps: int = 0) -> str:
    """The README of a training folder; ``averaged_steps``: how many steps' weights the saved ones are the mean of."""
    base, out = config.pretrained_model_name_or_path, config.output_dir
    head = f"""---
base_model: {base}
library_name: diffusers
tags: [stable-diffusion, lora, guidance-distillation, sd-distill]
---
# Guidance-distilled LoRA for `{base}`
"""
    if config.conditioned_on_guidance:
        low, high = config.guidance_scale_range or (config.guidance_scale, config.guidance_scale)
        return (
            head
            + f"""
One LoRA for every guidance scale in **[{low:g}, {high:g}]** (rank {config.lora_rank}): the student
was told the scale through the UNet's `time_cond_proj_dim` (a {config.guidance_embedding_dim}-dim
guidance embedding, `time_embedding.cond_proj` in `{GUIDANCE_PROJ_WEIGHTS_NAME}`) and learnt what the
base predicts with classifier-free guidance at that scale. Stock `StableDiffusionPipeline` then samples
it at any `guidance_scale` with **one UNet pass per step** (it skips CFG for such a UNet):

```python
from diffusers import StableDiffusionPipeline
from sd_distill import load_student  # adds cond_proj, then loads the LoRA with its alpha
pipe = load_student(StableDiffusionPipeline.from_pretrained("{base}"), "{out}")
image = pipe("a photo of a cat", guidance_scale={config.guidance_scale:g}).images[0]
```

With `--export_fused_pipeline DIR` the folder DIR is a full pipeline that stock diffusers loads alone
(`StableDiffusionPipeline.from_pretrained(DIR{_export_dtype_argument(config)})`). In one-pass sampling
`negative_prompt` and `guidance_rescale` are ignored (there is no unconditional pass to apply them to).

{_averaged(config, averaged_steps)}Training settings are in `{CONFIG_FILE_NAME}`.
"""
        )
    return (
        head
        + f"""
This LoRA (rank {config.lora_rank}) was trained with sd-distill to make the UNet predict, in one
conditional pass, what the base model predicts with classifier-free guidance at scale
**{config.guidance_scale}**. Sample it with `guidance_scale=1` (one UNet pass per step, about twice
as fast as the base with guidance):

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights("{out}")
image = pipe("a photo of a cat", guidance_scale=1.0).images[0]
```

{_averaged(config, averaged_steps)}Training settings are in `{CONFIG_FILE_NAME}`.
"""
    )
