#!/usr/bin/env bash
# Debian packages the tests use besides Python: Slurm + munge (tests/slurm start a real local
# cluster) and shellcheck (the sbatch scripts are linted). Idempotent: installs only what is
# missing, only as root with apt-get; otherwise says which tests will be skipped.
#   bash scripts/ci_deps.sh        (scripts/test.sh runs it)
set -uo pipefail
packages=(slurmctld slurmd slurm-client munge shellcheck)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
((${#missing[@]})) || exit 0
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "ci_deps.sh: ${missing[*]} not installed and no root/apt-get here: tests/slurm (and the shellcheck test) will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "ci_deps.sh: apt-get install ${missing[*]}" >&2
if ! apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -q >/dev/null 2>&1
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
    echo "ci_deps.sh: apt-get install ${missing[*]} failed: tests/slurm will try again, then be skipped" >&2
fi
exit 0
