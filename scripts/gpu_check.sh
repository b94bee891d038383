#!/usr/bin/env bash
# The GPU checks, run once on a lent GPU machine (see README "GPU"): the gpu-marked tests and
# bench/loss_gpu.py. The machine has torch + CUDA but not this project's stack; wheels it lacks
# (megatron-core, pytest) can be put in .gpu_wheels/ (pip download --python-version 3.12 ...).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONWARNINGS=ignore
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
  if [ -d .gpu_wheels ]; then
    python -m pip install -q --no-index --find-links .gpu_wheels pytest 2>&1 | tail -2
    # megatron-core pins numpy<2 in its metadata; its CE runs with the numpy the machine has.
    python -m pip install -q --no-deps --no-index --find-links .gpu_wheels megatron-core einops 2>&1 | tail -2
  fi
  python -c "import megatron.core, pytest; print('megatron-core', megatron.core.__version__, 'pytest', pytest.__version__)"
  python -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs 2>&1 | tail -25
  python bench/loss_gpu.py 2>&1
} 2>&1 | tee "$out/gpu_check.log"
