#!/usr/bin/env bash
# A CPU simulation of the lent GPU machine, to prove the GPU check's install before a GPU is lent.
#
# The machine (scripts/gpu_image.txt): Python 3.12, torch 2.11.0+cu130, transformers 5.17.0,
# lightning 2.6.6, numpy 2.5, ... and no NeMo. Here: a venv of Python 3.12 holding those versions
# (torch is PyPI's 2.11.0, the same CUDA build, running on the CPU), onto which the wheel set of
# scripts/gpu_wheels.sh is installed by the function scripts/gpu_check.sh uses (install_wheels,
# scripts/gpu_install.sh: into a target dir first on PYTHONPATH; the venv is never written to).
# Then the CPU-able parts of the check, on the tiny example (examples/tiny, conf/*_tiny.yaml):
#   install   install_wheels + its import check (megatron.core, nemo.lightning, llm.train, the
#             resiliency callback), and the replacements resolving to the target;
#   numpy2    megatron-core's np.product sites under the image's numpy 2 with our shim: each
#             site called (tests/helpers/np_product_probe.py; without the shim too, which must
#             fail: proves the need), and a checkpoint saved at DP=2 (2 processes) through the
#             fully parallel save NeMo uses on GPUs (tests/helpers/np_product_dp2.py);
#   prepare   nemo-dcod prepare -> a packed store;
#   train_tp1 nemo-dcod train, 1 process, 4 steps, checkpoints at 2 and 4;
#   score_tp1 nemo-dcod score of that checkpoint on a copy of the store;
#   train_dp2 nemo-dcod train, 2 processes (DP=2), 4 steps, checkpoints at 2 and 4 (on CPU our
#             trainer turns NeMo's fully parallel save off, hence numpy2's DP=2 save above).
# Not here: bf16, the distributed optimizer (neither runs on CPU: nemo_dcod/parallel/cpu_mode.py),
# anything needing CUDA. Exit 0 and "gpu_sim: PASS" only if every step passed.
#
# Usage: bash scripts/gpu_sim.sh [--wheels DIR] [--cached-only] [--build-only]
#   --wheels DIR    a wheel set made by scripts/gpu_wheels.sh (default: the cached one, made when
#                   missing); e.g. an older commit's set, to see it fail.
#   --cached-only   exit 3, running nothing, unless the venv and the wheel set are cached
#                   (tests/distributed/test_gpu_sim.py).
#   --build-only    make the venv and the wheel set (~3 min, ~6 GB, PyPI), run nothing.
# Cache: GPU_SIM_CACHE (default ~/.cache/nemo_dcod/gpu_sim): image-<hash of gpu_image.txt and the
# Python>/ (the venv), wheels-<hash of gpu_wheels.sh and gpu_image.txt>/ (the set); a new hash
# makes a new entry. Python 3.12: GPU_SIM_PYTHON, else pyenv's 3.12.x, else python3.12 on PATH.
# Work files: GPU_SIM_WORK (default a temp dir, removed at exit).
# The braces: bash reads the whole script before running it, so editing it during a run is safe.
{
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
wheels_arg="" cached_only=0 build_only=0
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) wheels_arg=$(cd "$2" && pwd) || exit 2; shift 2 ;;
    --cached-only) cached_only=1; shift ;;
    --build-only) build_only=1; shift ;;
    *) echo "gpu_sim: unknown argument $1 (see the usage at the top of $0)"; exit 2 ;;
  esac
done
cache=${GPU_SIM_CACHE:-$HOME/.cache/nemo_dcod/gpu_sim}
py=${GPU_SIM_PYTHON:-}
if [ -z "$py" ]; then
  for candidate in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 "$(command -v python3.12)"; do
    [ -x "$candidate" ] && { py=$candidate; break; }
  done
fi
if [ -z "$py" ]; then
  echo "gpu_sim: no Python 3.12 (the GPU machine's): set GPU_SIM_PYTHON"
  exit 3
fi
pyver=$("$py" -c 'import sys; print(sys.version.split()[0])')
key() { { cat "$@"; echo "$pyver"; } | sha256sum | cut -c1-12; }
venv=$cache/image-$(key scripts/gpu_image.txt)
wheels=${wheels_arg:-$cache/wheels-$(key scripts/gpu_wheels.sh scripts/gpu_image.txt)}

if [ "$cached_only" = 1 ]; then
  for need in "$venv/.complete" "$wheels/wheels.tar.xz"; do
    [ -f "$need" ] || { echo "gpu_sim: not cached: $need (make it: bash scripts/gpu_sim.sh --build-only)"; exit 3; }
  done
fi

build_venv() {
  echo "gpu_sim: making the image's venv $venv (Python $pyver)"
  rm -rf "$venv"
  "$py" -m venv "$venv" || return 1
  grep -v -e '^#' -e '^-' scripts/gpu_image.txt > "$venv/requirements.txt"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$venv/requirements.txt" 2>&1 \
    | { grep -v '^WARNING: Location' || true; }
  [ "${PIPESTATUS[0]}" = 0 ] || return 1
  # pip pulls in what the pinned versions need; what the image does not have is removed, so that
  # the carried set has to provide it as on the machine.
  "$venv/bin/python" -I - scripts/gpu_image.txt <<'EOF' || return 1  # -I: not the checkout on sys.path
import importlib.metadata as md, re, subprocess, sys
norm = lambda spec: re.sub(r"[-_.]+", "-", re.split(r"[=<>\[ ]", spec)[0]).lower()
image = {norm(w.lstrip("-")) for l in open(sys.argv[1]) if not l.startswith("#") for w in l.split()}
extra = sorted({norm(d.metadata["Name"]) for d in md.distributions()} - image - {"pip"})
print(f"gpu_sim: removing what pip pulled in and the image lacks: {', '.join(extra) or 'nothing'}")
sys.exit(subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *extra]).returncode if extra else 0)
EOF
  "$venv/bin/python" -m pip freeze --all > "$venv/freeze.txt" && touch "$venv/.complete"
}

if [ ! -f "$venv/.complete" ]; then
  build_venv || { echo "gpu_sim: making the venv failed"; exit 1; }
fi
if [ ! -f "$wheels/wheels.tar.xz" ]; then
  [ -n "$wheels_arg" ] && { echo "gpu_sim: no $wheels/wheels.tar.xz"; exit 2; }
  bash scripts/gpu_wheels.sh "$wheels" || { echo "gpu_sim: making the wheel set failed"; exit 1; }
fi
[ "$build_only" = 1 ] && { echo "gpu_sim: cached: $venv, $wheels"; exit 0; }

work=${GPU_SIM_WORK:-$(mktemp -d)}
[ -z "${GPU_SIM_WORK:-}" ] && trap 'rm -rf "$work"' EXIT
mkdir -p "$work"
python=$venv/bin/python
cli="$python -m nemo_dcod.cli"
export python work cli
# megatron-core's inference.unified_memory JIT-builds a CUDA extension at import when torch is a
# CUDA build (it is, here too); with no GPU to read the arch from, torch's arch list is empty and
# that raises IndexError instead of the RuntimeError it catches. The GPU machine's arch is 9.0.
# TORCH_EXTENSIONS_DIR: that build's lock file, left behind by a process killed while holding it
# (a step's timeout), makes every later import wait on it; one directory per run.
export TORCH_CUDA_ARCH_LIST=9.0 CUDA_VISIBLE_DEVICES="" PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR=$work/torch_extensions
export PYTHONPATH=$work/site:$repo
# shellcheck source=scripts/gpu_install.sh
source scripts/gpu_install.sh

t0=$(date +%s)
summary=$work/summary.txt
: > "$summary"
failed=()
# sim_step NAME LIMIT_S COMMAND...: run, log to $work/NAME.log, print its tail, record rc and time.
sim_step() {
  local name=$1 limit=$2 s rc
  shift 2
  s=$(date +%s)
  echo "=== $name"
  # bash -c: the command may be one of the exported functions here.
  timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" > "$work/$name.log" 2>&1
  rc=$?
  grep -v -e '^WARNING: Location' -e 'Warning' -e '^  warnings.warn' "$work/$name.log" | tail -n "${GPU_SIM_TAIL:-8}"
  echo "$name: rc=$rc $(( $(date +%s) - s )) s" | tee -a "$summary"
  [ "$rc" = 0 ] || failed+=("$name")
  return "$rc"
}
# skip_rest FAILED NAME...: record NAME... as skipped because FAILED failed.
skip_rest() {
  local cause=$1 name
  shift
  for name in "$@"; do echo "$name: SKIPPED ($cause failed)" | tee -a "$summary"; failed+=("$name"); done
}

echo "gpu_sim: venv $venv (Python $pyver; $(grep -i -E '^(torch|numpy|transformers|lightning)==' "$venv/freeze.txt" | tr '\n' ' '))"
echo "gpu_sim: wheels $wheels ($(wc -l < "$wheels/wheels.txt" 2>/dev/null || echo '?') wheels, $(stat -c %s "$wheels/wheels.tar.xz" | awk '{printf "%.1f", $1 / 2^20}') MiB xz)"
export -f install_wheels
if ! sim_step install 400 install_wheels "$python" "$wheels" "$work/site"; then
  skip_rest install numpy2 prepare train_tp1 score_tp1 train_dp2
else
  numpy2() {
    "$python" tests/helpers/np_product_probe.py || return 1
    "$python" tests/helpers/np_product_dp2.py "$work/ckpt_dp2" || return 1
    echo "-- the sites without the shim (expected: AttributeError):"
    ! "$python" tests/helpers/np_product_probe.py --no-shim
  }
  export -f numpy2
  sim_step numpy2 300 numpy2
  if sim_step prepare 300 $cli prepare --config conf/prepare_tiny.yaml "out_dir=$work/store"; then
    train() {  # train RUN_DIR DEVICES
      $cli train --config conf/train_store_tiny.yaml "run_dir=$1" "data.path=$work/store" \
        parallel.tensor_model_parallel_size=1 "trainer.devices=$2" trainer.max_steps=4 \
        trainer.ckpt_every_n_steps=2 trainer.val_check_interval=2 trainer.log_every_n_steps=1 || return 1
      ls -d "$1"/checkpoints/*
    }
    score() {  # score RUN_DIR DEVICES
      rm -rf "$work/score_store" && cp -r "$work/store" "$work/score_store" || return 1
      $cli score --config conf/score_tiny.yaml "checkpoint=$1/checkpoints" "store=$work/score_store" \
        parallel.tensor_model_parallel_size=1 "trainer.devices=$2"
    }
    export -f train score
    if sim_step train_tp1 480 train "$work/run_tp1" 1; then
      sim_step score_tp1 400 score "$work/run_tp1" 1
    else
      skip_rest train_tp1 score_tp1
    fi
    sim_step train_dp2 480 train "$work/run_dp2" 2
  else
    skip_rest prepare train_tp1 score_tp1 train_dp2
  fi
fi
echo "=== gpu_sim summary ($(( $(date +%s) - t0 )) s; logs in $work$([ -z "${GPU_SIM_WORK:-}" ] && echo ', removed at exit: set GPU_SIM_WORK to keep them'))"
cat "$summary"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_sim: FAIL (${failed[*]})"
  exit 1
fi
echo "gpu_sim: PASS"
exit 0
}
