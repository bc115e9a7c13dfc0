#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, x86-64), which has torch, accelerate, transformers and
# peft but not these. Run here, in the repo root, before carrying .whl/ to the device.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
# DeepSpeed ships only a source archive: build its pure-Python wheel here (its ops compile on first use).
DS_BUILD_OPS=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
for pkg in diffusers==0.42.1 datasets==5.2.0 hjson ninja py-cpuinfo dill multiprocess xxhash; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "$pkg" \
    || echo "no wheel for $pkg: build it with 'pip wheel --no-deps $pkg -w .whl' here"
done
ls .whl
