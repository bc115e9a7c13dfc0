"""Names shared by training, evaluation and the CLIs; torch-free, so importing it costs nothing."""

from __future__ import annotations

import re

DEFAULT_BASE_MODEL = "stabilityai/stable-diffusion-2-1-base"
DEFAULT_GUIDANCE_SCALE = 7.5

# What a training run writes into its output folder (and into each checkpoint).
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
CONFIG_FILE_NAME = "sd_distill_config.json"
STATE_FILE_NAME = "training_state.json"
SUMMARY_FILE_NAME = "train_summary.json"
MODEL_CARD_NAME = "README.md"
CHECKPOINT_PREFIX = "checkpoint-"
# A guidance-conditioned student's time_embedding.cond_proj, beside the LoRA (stock LoRA loading
# rejects non-LoRA keys, so it cannot live in the LoRA file).
GUIDANCE_PROJ_WEIGHTS_NAME = "guidance_cond_proj.safetensors"
GUIDANCE_PROJ_KEY = "time_embedding.cond_proj.weight"

# Tabular data files `datasets` reads, by suffix -> its builder name.
DATA_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
DATA_SUFFIXES = tuple(DATA_BUILDERS)

# Precision names of the comparison loop's --dtype.
DTYPE_NAMES = ("fp16", "bf16", "fp32")

# A hub repo id, 'owner/name' (what is neither a local folder nor this is a path that is not there).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
