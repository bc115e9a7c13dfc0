#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): one GPU, about 8 minutes. On the lent machine the
# packages torch's image lacks (diffusers, datasets, deepspeed, ...) come as wheels in .whl/, made
# here with benchmarks/gpu_wheels.sh; the OUT variable (the device tool's output folder) is used if set.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 benchmarks/gpu_check.py "${OUT:-outputs/gpu_check}" "$@"
