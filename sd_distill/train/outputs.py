"""What a run leaves in its output folder: the LoRA with its config and model card, the summary,
and optionally a fused pipeline; and the rule that a run never writes over another one."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..constants import CONFIG_FILE_NAME, LORA_WEIGHTS_NAME, MODEL_CARD_NAME, SUMMARY_FILE_NAME
from ..lora import adapter_metadata, lora_state_dict, save_lora
from .checkpoint import deepspeed_engine
from .config import TrainConfig

logger = logging.getLogger(__name__)


def output_dir_errors(config: TrainConfig, resuming: bool) -> list[str]:
    """Refuse to write over a finished run or mix checkpoints of two runs (nothing is lost)."""
    out = Path(config.output_dir)
    if config.overwrite_output_dir or resuming or not out.exists():
        return []
    if (out / LORA_WEIGHTS_NAME).exists():
        return [
            f"--output_dir {str(out)!r} already holds a finished run; pass --overwrite_output_dir to replace it "
            "or choose another folder."
        ]
    if any(out.glob("checkpoint-*")):
        return [
            f"--output_dir {str(out)!r} has checkpoints of an earlier run; pass --resume_from_checkpoint latest "
            "to continue it or --overwrite_output_dir to start over."
        ]
    return []


def clear_previous_run(out: Path) -> None:
    for path in list(out.glob("checkpoint-*")) + list(out.glob(".checkpoint-*")):
        shutil.rmtree(path, ignore_errors=True)
    for name in (LORA_WEIGHTS_NAME, SUMMARY_FILE_NAME):
        (out / name).unlink(missing_ok=True)


def save_final(accelerator: Any, model: Any, config: TrainConfig) -> None:
    """The adapter in diffusers LoRA format, the config and a model card; optionally a fused pipeline."""
    lora = lora_state_dict(model, deepspeed_engine(accelerator))  # collective under DeepSpeed
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    out = Path(config.output_dir)
    save_lora(lora, out, adapter_metadata(model))
    (out / CONFIG_FILE_NAME).write_text(config.to_json())
    (out / MODEL_CARD_NAME).write_text(model_card(config))
    logger.info("saved the LoRA adapter to %s", out / LORA_WEIGHTS_NAME)
    if config.export_fused_pipeline:
        export_fused_pipeline(
            config.pretrained_model_name_or_path, out, config.export_fused_pipeline, config.revision, config.variant
        )
    accelerator.wait_for_everyone()


def write_summary(config: TrainConfig, stats: Any) -> None:
    (Path(config.output_dir) / SUMMARY_FILE_NAME).write_text(json.dumps(asdict(stats), indent=2))


def export_fused_pipeline(
    base: str, lora_dir: Path, target: str, revision: str | None = None, variant: str | None = None
) -> Path:
    """Write a full pipeline with the LoRA fused into the UNet (one folder, no peft needed)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        base, revision=revision, variant=variant, safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(str(lora_dir))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(target, safe_serialization=True)
    shutil.copy(lora_dir / CONFIG_FILE_NAME, Path(target) / CONFIG_FILE_NAME)
    logger.info("exported the fused pipeline to %s", target)
    return Path(target)


def model_card(config: TrainConfig) -> str:
    return f"""---
base_model: {config.pretrained_model_name_or_path}
library_name: diffusers
tags: [stable-diffusion, lora, guidance-distillation, sd-distill]
---
# Guidance-distilled LoRA for `{config.pretrained_model_name_or_path}`

This LoRA (rank {config.lora_rank}) was trained with sd-distill to make the UNet predict, in one
conditional pass, what the base model predicts with classifier-free guidance at scale
**{config.guidance_scale}**. Sample it with `guidance_scale=1` (one UNet pass per step, about twice
as fast as the base with guidance):

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{config.pretrained_model_name_or_path}")
pipe.load_lora_weights("{config.output_dir}")
image = pipe("a photo of a cat", guidance_scale=1.0).images[0]
```

Training settings are in `{CONFIG_FILE_NAME}`.
"""
