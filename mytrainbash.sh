#!/usr/bin/env bash
# The seed recipe's launcher, kept: `bash mytrainbash.sh` distills SD-2.1-base's guidance into a
# LoRA. Every setting below can be overridden from the environment, e.g.
#   MODEL_NAME=./my-sd OUTPUT_DIR=./out ACCELERATE_CONFIG=accelerate_configs/multi_gpu_zero2.yaml bash mytrainbash.sh
# and extra arguments go straight to train_sd_distil_lora.py (later flags win; a data flag among them,
# --prompts_file, --train_data_dir or --dataset_name, replaces the environment's data source):
#   bash mytrainbash.sh --max_train_steps 2000 --cache_latents --cache_text_embeddings
set -euo pipefail
# Paths you give (OUTPUT_DIR, PROMPTS_FILE, extra args) are relative to where you run it from; the
# repository's own files are found beside this script.
HERE="$(cd "$(dirname "$0")" && pwd)"

# The data source: the environment's, unless the extra arguments name one themselves.
args_data=""
for arg in "$@"; do
  case "$arg" in
    --prompts_file|--prompts_file=*) args_data=prompts ;;
    --dataset_name|--dataset_name=*|--train_data_dir|--train_data_dir=*) args_data=images ;;
  esac
done
if [ -n "${PROMPTS_FILE:-}" ] && [ -n "${DATASET_NAME:-}" ]; then
  echo "error: PROMPTS_FILE and DATASET_NAME are both set; set one (prompts train on guided trajectories)" >&2
  exit 2
fi

MODEL_NAME="${MODEL_NAME:-stabilityai/stable-diffusion-2-1-base}"
OUTPUT_DIR="${OUTPUT_DIR:-./sd-distill-v21}"
# DiffusionDB's first 10k images, read from the hub's parquet conversion (hub loading scripts,
# which the seed relied on, are no longer supported by `datasets`).
DATASET_NAME="${DATASET_NAME:-hf://datasets/poloclub/diffusiondb@refs%2Fconvert%2Fparquet/2m_first_10k/train/*.parquet}"
# A prompts file (one per line) instead of a dataset: distils from guided trajectories, no image needed.
PROMPTS_FILE="${PROMPTS_FILE:-}"
# images (default; noised dataset images), teacher_trajectories or student_trajectories (README: which to pick)
prompts_given=$([ -n "$PROMPTS_FILE" ] || [ "$args_data" = prompts ] && echo 1 || true)
TRAIN_STATES="${TRAIN_STATES:-$([ -n "$prompts_given" ] && echo teacher_trajectories || echo images)}"
GUIDANCE_SCALE_RANGE="${GUIDANCE_SCALE_RANGE:-}"   # e.g. "1.5 10": one LoRA for every scale in the range
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-}"   # empty: accelerate's own default config
DEFAULT_PROMPT="${DEFAULT_PROMPT:-A man dancing}"
RESOLUTION="${RESOLUTION:-512}"
# 8 per GPU at 512 px with cached latents fits a 24 GB GPU in fp16 (LoRA rank 4); lower it on smaller ones.
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-8}"
# Empty: the accelerate config's value if it sets one, else 1 (a value in both must agree).
GRADIENT_ACCUMULATION_STEPS="${GRADIENT_ACCUMULATION_STEPS:-}"
ALLOW_TF32="${ALLOW_TF32:-1}"   # TF32 matmuls on Ampere+ GPUs (no effect on a CPU); 0 to turn off
# The seed used 5e-6 because it (unknowingly) fine-tuned the whole UNet; a LoRA needs ~1e-4.
LEARNING_RATE="${LEARNING_RATE:-1e-4}"
# Empty: the CLI's default (warmup_stable_decay with a range of scales, constant without).
LR_SCHEDULER="${LR_SCHEDULER:-}"
LR_WARMUP_STEPS="${LR_WARMUP_STEPS:-0}"
GUIDANCE_SCALE="${GUIDANCE_SCALE:-7.5}"

if [ -z "${ACCELERATE:-}" ]; then  # yours if set; else the one on PATH, else the repository's .venv
  if ! command -v accelerate >/dev/null 2>&1 && [ -x "$HERE/.venv/bin/accelerate" ]; then
    ACCELERATE="$HERE/.venv/bin/accelerate"
  else
    ACCELERATE=accelerate
  fi
fi
config_args=()
if [ -n "$ACCELERATE_CONFIG" ]; then
  if [ ! -e "$ACCELERATE_CONFIG" ] && [ -e "$HERE/$ACCELERATE_CONFIG" ]; then
    ACCELERATE_CONFIG="$HERE/$ACCELERATE_CONFIG"  # accelerate_configs/<x>.yaml from anywhere
  fi
  config_args=(--config_file "$ACCELERATE_CONFIG")
fi

optional_args=()
if [ -n "$GRADIENT_ACCUMULATION_STEPS" ]; then
  optional_args+=(--gradient_accumulation_steps="$GRADIENT_ACCUMULATION_STEPS")
fi
if [ -n "$LR_SCHEDULER" ]; then
  optional_args+=(--lr_scheduler="$LR_SCHEDULER")
fi
data_args=()
if [ -n "$PROMPTS_FILE" ]; then
  data_args=(--prompts_file="$PROMPTS_FILE")
elif [ -z "$args_data" ]; then
  data_args=(--dataset_name="$DATASET_NAME")
fi
if [ -n "$GUIDANCE_SCALE_RANGE" ]; then
  read -r -a range <<< "$GUIDANCE_SCALE_RANGE"
  optional_args+=(--guidance_scale_range "${range[@]}")
fi
if [ "$ALLOW_TF32" = "1" ]; then
  optional_args+=(--allow_tf32)
fi

mkdir -p "$OUTPUT_DIR"
echo "distilling $MODEL_NAME (w=${GUIDANCE_SCALE_RANGE:-$GUIDANCE_SCALE}, states: $TRAIN_STATES) into a LoRA in $OUTPUT_DIR"
# with no ACCELERATE_CONFIG, accelerate reads its own default config if one exists (say which: it may be stale)
default_config="${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}/accelerate/default_config.yaml"
if [ -z "$ACCELERATE_CONFIG" ] && [ -f "$default_config" ]; then
  echo "accelerate config: $default_config (accelerate's default; set ACCELERATE_CONFIG to choose one)"
elif [ -z "$ACCELERATE_CONFIG" ]; then
  echo "accelerate config: none (accelerate's defaults: every GPU, no mixed precision); set ACCELERATE_CONFIG"
fi

# ${a[@]+"${a[@]}"}: an empty array under `set -u` on bash before 4.4 (macOS ships 3.2).
# --quiet: a one-process launch that fails ends with our one `error:` line, not the launcher's own
# traceback after it (accelerate has no such switch for several processes: see the README).
exec "$ACCELERATE" launch --quiet ${config_args[@]+"${config_args[@]}"} "$HERE/train_sd_distil_lora.py" \
  --pretrained_model_name_or_path="$MODEL_NAME" \
  --output_dir="$OUTPUT_DIR" \
  ${data_args[@]+"${data_args[@]}"} \
  --train_states="$TRAIN_STATES" \
  --default_prompt="$DEFAULT_PROMPT" \
  --resolution="$RESOLUTION" \
  --train_batch_size="$TRAIN_BATCH_SIZE" \
  --learning_rate="$LEARNING_RATE" \
  --lr_warmup_steps="$LR_WARMUP_STEPS" \
  --guidance_scale="$GUIDANCE_SCALE" \
  ${optional_args[@]+"${optional_args[@]}"} \
  "$@"
