#!/usr/bin/env bash
# The README's test command: set up .venv (reused when current), lint, type-check, run the tests.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ci_deps.sh  # Slurm, munge, shellcheck for tests/slurm (root + apt-get; else skipped)
# One command per line: `set -e` does not stop at a failure inside an `a && b && c` list (only at
# its last command), which let a lint failure pass unnoticed.
echo "== ruff"
.venv/bin/ruff check nemo_dcod tests bench
.venv/bin/ruff format --check nemo_dcod tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -ra "$@"
