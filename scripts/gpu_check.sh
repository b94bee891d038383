#!/usr/bin/env bash
# The GPU check: one command on a lent GPU machine that has Python 3.12, torch + CUDA, triton,
# transformers and lightning but no megatron-core, NeMo or network (README "GPU"). Under 10
# minutes on one H200 (every step has a timeout within GPU_CHECK_SECONDS, default 570):
#   0. install from .gpu_wheels/wheels.tar.xz (made by scripts/gpu_wheels.sh, carried with
#      the device tool's carry=[".gpu_wheels"]) the distributions the machine lacks, --no-deps;
#   1. a tokenizer with Llama 3's 128256-token vocabulary and synthetic traces with engine
#      log-probs -> `nemo-dcod prepare` -> packed stores of 4096-token rows;
#   2. (a)+(d) bench/train_gpu.py: `nemo-dcod train`'s run in bf16 through NeMo on the packed
#      store, llama3.2 1b (1.24B parameters), seq_length 4096, SFT and DisCorD alternating in the
#      same run: tokens/s/GPU, MFU, peak memory vs the dry-run estimate, DisCorD/SFT;
#   3. (b) `nemo-dcod score` of the trained checkpoint in bf16 and in fp32 on the same rows:
#      max / mean |Δ log-prob|;
#   4. (d) bench/loss_gpu.py (fused and unfused DisCorD vs Megatron's CE);
#   5. (c) the GPU tests, pytest -m gpu tests/gpu;
#   6. where Transformer Engine imports (NVIDIA's NeMo container): bench/train_gpu.py with the TE
#      spec on THD rows and FP8 (the FP8-active test runs in 5).
# Everything it writes for the caller goes under OUT_DIR (default $OUT, else gpu_out): a log per
# step, summary.txt with each step's exit code and time, and the RESULT lines. Big files
# (checkpoints, stores) go to GPU_CHECK_WORK (default /tmp/dcod_gpu).
# Usage: bash scripts/gpu_check.sh [OUT_DIR]
#        bash scripts/gpu_check.sh --install-only   (step 0 only; scripts/gpu_wheels.sh's simulation)
set -uo pipefail
cd "$(dirname "$0")/.."
install_only=0
if [ "${1:-}" = "--install-only" ]; then install_only=1; shift; fi
out=$(mkdir -p "${1:-${OUT:-gpu_out}}" && cd "${1:-${OUT:-gpu_out}}" && pwd)
work=${GPU_CHECK_WORK:-/tmp/dcod_gpu}
python=${PYTHON:-python}
budget=${GPU_CHECK_SECONDS:-570}
wheels=${GPU_WHEELS:-.gpu_wheels/wheels.tar.xz}
mkdir -p "$work"
export out work python wheels
export PYTHONPATH=$PWD PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false DCOD_GPU_MEMORY_GIB=${DCOD_GPU_MEMORY_GIB:-130}
t0=$(date +%s)
summary=$out/summary.txt
: > "$summary"

# step NAME LIMIT_S COMMAND...: run with a timeout (at most what is left of the budget), log to
# $out/NAME.log, record the exit code and duration; never stops the script.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((budget - ($(date +%s) - t0)))
  if [ "$left" -lt 20 ]; then
    echo "$name: SKIPPED (budget of ${budget} s spent)" | tee -a "$summary"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local s=$(date +%s)
  echo "=== $name (timeout ${limit} s)"
  # bash -c: the command may be one of the exported functions below.
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  echo "$name: rc=$rc $(( $(date +%s) - s )) s" | tee -a "$summary"
  grep -h '^RESULT' "$out/$name.log" >> "$summary"
  return $rc
}

install_wheels() {
  [ -f "$wheels" ] || { echo "no $wheels: run scripts/gpu_wheels.sh on the CPU machine and carry .gpu_wheels"; return 1; }
  rm -rf "$work/wheels"
  "$python" - "$wheels" "$work/wheels" <<'EOF' || return 1
"""Unpack the carried wheels and install, without dependencies, the distributions not already here."""
import importlib.metadata as md, re, subprocess, sys, tarfile
from pathlib import Path

archive, dest = sys.argv[1], Path(sys.argv[2])
with tarfile.open(archive) as tar:
    tar.extractall(dest, filter="data")
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}
todo, kept = [], []
for wheel in sorted(dest.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if norm(name) in have:
        kept.append(f"{name} {have[norm(name)]} (carried {version})")
    else:
        todo.append(str(wheel))
print(f"already installed, kept: {', '.join(kept) or 'none'}")
print(f"installing {len(todo)} carried wheels (--no-deps)")
cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", *todo]
sys.exit(subprocess.run(cmd).returncode if todo else 0)
EOF
  "$python" -m pip check 2>&1 | head -n 20 || true  # informational: the machine's own versions win
  "$python" -c "import megatron.core, nemo, pytest, nemo.collections.llm as llm, nemo.lightning; llm.train; print('megatron-core', megatron.core.__version__, 'nemo', nemo.__version__, 'pytest', pytest.__version__)"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$python" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
} 2>&1 | tee "$out/machine.txt"

export -f install_wheels
step install 180 install_wheels || { echo "install failed: see $out/install.log"; exit 1; }
[ "$install_only" = 1 ] && exit 0

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
step data 90 make_data

step train_1b 240 "$python" bench/train_gpu.py --store "$work/store_train" --vocab 128256 --keep "$work/train_1b"

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
step score 150 score_bf16_vs_fp32

step loss_gpu 90 "$python" bench/loss_gpu.py

step pytest_gpu 200 "$python" -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs

if [ "$have_te" = 1 ]; then
  step train_1b_te_fp8 200 "$python" bench/train_gpu.py --store "$work/store_train" --vocab 128256 \
    --spec te --fp8 hybrid
fi

echo "=== summary ($(( $(date +%s) - t0 )) s)"
cat "$summary"
