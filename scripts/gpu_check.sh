#!/usr/bin/env bash
# The GPU check: one device call on a lent GPU machine (Python 3.12 `python3`, torch 2.11 + CUDA,
# transformers 5.17, lightning 2.6.6, numpy 2, ... but no megatron-core, NeMo or network:
# scripts/gpu_image.txt), with .gpu_wheels/ (scripts/gpu_wheels.sh) carried. Every step has a
# limit, and the limits plus a reserve add up to the budget (GPU_CHECK_SECONDS, default 570, for a
# call's timeout_s of 600; `--plan` prints them), so that nothing is cut by the call's limit and
# the steps run most valuable first; a step that fails does not stop the next:
#   install     install_wheels (scripts/gpu_install.sh, as scripts/gpu_sim.sh simulates it on
#               CPU): the carried distributions the image lacks, and its lightning replaced, into
#               $GPU_CHECK_WORK/site, first on PYTHONPATH; then the import check (incl. llm.train);
#   data        a tokenizer with Llama 3's 128256-token vocabulary and synthetic traces with engine
#               log-probs -> `nemo-dcod prepare` -> packed stores of 4096-token rows;
#   train_1b    bench/train_gpu.py: `nemo-dcod train`'s run in bf16 through NeMo on the packed
#               store, llama3.2 1b (1.24B parameters), seq_length 4096, SFT and DisCorD alternating
#               in the same run: tokens/s/GPU, MFU, peak memory vs the dry-run estimate (planned
#               for the card found: DCOD_GPU_MEMORY_GIB = its memory less 8 GiB), DisCorD/SFT;
#   loss_gpu    bench/loss_gpu.py: fused and unfused DisCorD vs Megatron's CE (target <= 1.05);
#   pytest_gpu  the GPU tests, pytest -m gpu tests/gpu;
#   score       `nemo-dcod score` of train_1b's checkpoint in bf16 and in fp32 on the same rows:
#               max / mean |d log-prob|;
#   te_fp8      only where Transformer Engine imports (NVIDIA's NeMo container, not the image):
#               bench/train_gpu.py with the TE spec on THD rows and FP8, in what budget is left.
# What comes back (OUT_DIR, default $OUT, else gpu_out): machine.txt, summary.txt (each step's exit
# code and time, and every RESULT line) and logs.tar.gz (every step's log and the training run's
# metrics): 3 files of the device tool's 8. Big files (checkpoints, stores) go to GPU_CHECK_WORK
# (default /tmp/dcod_gpu).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]
#        bash scripts/gpu_check.sh --install-only [OUT_DIR]   (the install step alone)
#        bash scripts/gpu_check.sh --plan                     (the step limits against the budget)
set -uo pipefail
cd "$(dirname "$0")/.."
mode=all
case "${1:-}" in
  --install-only) mode=install; shift ;;
  --plan) mode=plan; shift ;;
esac
python=${PYTHON:-python3}
budget=${GPU_CHECK_SECONDS:-570}
# Step limits in seconds, in the order they run. RESERVE: the machine report before the first
# step and packing the logs after the last. Not yet timed on a GPU: set from the CPU simulation's
# install (~70 s on 2 shared cores) and the runs' sizes; train_1b: 12 steps of 4 x 4096 tokens
# (~6 s of compute on an H100) after NeMo's start and before a 1.24B checkpoint's save.
STEPS=(install:110 data:40 train_1b:180 loss_gpu:60 pytest_gpu:100 score:65)
RESERVE=15
planned=$RESERVE
for entry in "${STEPS[@]}"; do planned=$((planned + ${entry#*:})); done
limit_of() { local entry; for entry in "${STEPS[@]}"; do [ "${entry%%:*}" = "$1" ] && echo "${entry#*:}"; done; }
if [ "$mode" = plan ] || [ "$planned" -gt "$budget" ]; then
  echo "gpu_check plan: ${STEPS[*]} reserve:$RESERVE = ${planned} s of a ${budget} s budget"
  if [ "$planned" -gt "$budget" ]; then
    echo "gpu_check: the step limits (${planned} s) exceed the budget (${budget} s): raise GPU_CHECK_SECONDS or lower STEPS"
    exit 2
  fi
  exit 0
fi
out=$(mkdir -p "${1:-${OUT:-gpu_out}}" && cd "${1:-${OUT:-gpu_out}}" && pwd)
work=${GPU_CHECK_WORK:-/tmp/dcod_gpu}
wheel_dir=${GPU_WHEELS:-.gpu_wheels}
logs=$work/logs
mkdir -p "$work" "$logs"
export out work python logs
# The target of install_wheels first: its lightning 2.4.0 shadows the image's 2.6.6.
export PYTHONPATH=$work/site:$PWD PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
summary=$out/summary.txt
: > "$summary"

# step NAME COMMAND...: run with STEPS' limit for NAME (at most what is left of the budget less
# the reserve), log to $logs/NAME.log, record the exit code and duration; never stops the script.
step() {
  local name=$1 limit
  shift
  limit=$(limit_of "$name")
  local left=$((budget - RESERVE / 2 - ($(date +%s) - t0)))
  if [ "$left" -lt 20 ]; then
    echo "$name: SKIPPED (budget of ${budget} s spent)" | tee -a "$summary"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local s
  s=$(date +%s)
  echo "=== $name (limit ${limit} s; $(( $(date +%s) - t0 )) s of ${budget} s used)"
  # bash -c: the command may be one of the exported functions below.
  timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$logs/$name.log"
  echo "$name: rc=$rc $(( $(date +%s) - s )) s (limit $limit)" | tee -a "$summary"
  grep -h '^RESULT' "$logs/$name.log" >> "$summary"
  return $rc
}

finish() {
  echo "total: $(( $(date +%s) - t0 )) s of ${budget} s" >> "$summary"
  echo "=== summary"
  cat "$summary"
  [ -d "$work/train_1b" ] && find "$work/train_1b" -maxdepth 3 -name 'metrics.jsonl' -exec cp {} "$logs/train_1b_metrics.jsonl" \; 2>/dev/null
  tar -C "$work" -czf "$out/logs.tar.gz" logs
}

# The card's memory sizes the dry-run estimate the training step compares with.
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -dc '0-9')
[ -n "$gpu_mib" ] || gpu_mib=$("$python" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory // 2**20)" 2>/dev/null)
if [ -n "$gpu_mib" ] && [ -z "${DCOD_GPU_MEMORY_GIB:-}" ]; then
  export DCOD_GPU_MEMORY_GIB=$(( gpu_mib / 1024 - 8 ))  # less the CUDA context, NCCL, fragmentation
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$python" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
  echo "DCOD_GPU_MEMORY_GIB=${DCOD_GPU_MEMORY_GIB:-unset (no GPU found)}"
  echo "plan: ${STEPS[*]} reserve:$RESERVE = ${planned} s of ${budget} s"
} 2>&1 | tee "$out/machine.txt"

# shellcheck source=scripts/gpu_install.sh
source scripts/gpu_install.sh
export -f install_wheels
# TORCH_CUDA_ARCH_LIST: megatron-core builds a CUDA extension at import (inference.unified_memory);
# for Hopper alone, not every arch this torch knows.
# TORCH_EXTENSIONS_DIR: built once per run, in the work dir (a fresh machine has no other anyway).
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} TORCH_EXTENSIONS_DIR=$work/torch_extensions
if ! step install install_wheels "$python" "$wheel_dir" "$work/site"; then
  echo "install failed: see logs.tar.gz (logs/install.log)"
  finish
  exit 1
fi
[ "$mode" = install ] && { finish; exit 0; }

have_te=0
"$python" -c "import transformer_engine.pytorch" > /dev/null 2>&1 && have_te=1
echo "transformer engine: $([ $have_te = 1 ] && echo importable || echo absent)" | tee -a "$summary"

make_data() {
  "$python" - "$work" <<'EOF' || return 1
"""A word-level tokenizer padded to Llama 3's 128256 ids and traces with engine log-probs."""
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from helpers.trace_fixtures import make_tokenizer, record, write_jsonl

work = Path(sys.argv[1])
make_tokenizer(work / "tok", vocab_size=128256)
# ~1-2.5k tokens per trace: 120 traces pack into ~50 rows of 4096 tokens (training), 6 into ~3 (scoring).
write_jsonl(work / "train.jsonl", [record(i, words=900 + 29 * i % 1500, teacher=True) for i in range(120)])
write_jsonl(work / "score.jsonl", [record(i, words=700 + 97 * i % 900, teacher=True) for i in range(6)])
EOF
  for name in train score; do
    rm -rf "$work/store_$name"
    "$python" -m nemo_dcod.cli prepare "inputs=[$work/$name.jsonl]" format=jsonl fields.layout=prompt_response \
      fields.prompt=prompt fields.response=response fields.teacher_tokens=ids fields.teacher_logprobs=lps \
      "tokenizer=$work/tok" seq_length=4096 packing=best_fit answer_filter=none workers=2 \
      "out_dir=$work/store_$name" || return 1
  done
}
export -f make_data
step data make_data

step train_1b "$python" bench/train_gpu.py --store "$work/store_train" --vocab 128256 --keep "$work/train_1b"

score_bf16_vs_fp32() {
  for dtype in fp32 bf16; do
    rm -rf "$work/score_$dtype" && cp -r "$work/store_score" "$work/score_$dtype" || return 1
    "$python" -m nemo_dcod.cli score "checkpoint=$work/train_1b/checkpoints" "store=$work/score_$dtype" \
      what=reference dtype=$dtype overwrite=true "tokenizer=$work/tok" trainer.micro_batch_size=1 || return 1
  done
  "$python" - "$work/score_fp32" "$work/score_bf16" <<'EOF'
"""max / mean |Δ log-prob| of the stored log-probs, bf16 against fp32, over the loss tokens."""
import sys
import numpy as np
from nemo_dcod.data.store import PackedStore

fp32, bf16 = (PackedStore(p) for p in sys.argv[1:3])
diffs = []
for i in range(len(fp32)):
    a, b = fp32.row(i), bf16.row(i)
    mask = a["loss_mask"].astype(bool)
    diffs.append(np.abs(a["teacher_logprobs"][mask].astype(np.float64) - b["teacher_logprobs"][mask]))
d = np.concatenate(diffs)
print(f"score bf16 vs fp32: {len(fp32)} rows, {d.size} loss tokens")
print(f"RESULT score_bf16_vs_fp32 max_abs_dlogprob={d.max():.4g} mean_abs_dlogprob={d.mean():.4g}")
EOF
}
export -f score_bf16_vs_fp32
step loss_gpu "$python" bench/loss_gpu.py
step pytest_gpu "$python" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs
step score score_bf16_vs_fp32

if [ "$have_te" = 1 ]; then
  STEPS+=(te_fp8:9999)  # what is left of the budget
  step te_fp8 "$python" bench/train_gpu.py --store "$work/store_train" --vocab 128256 \
    --spec te --fp8 hybrid
fi
finish
