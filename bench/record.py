"""Run a benchmark and keep its whole output under ``bench/results/``, with machine, date and commit.

    .venv/bin/python bench/record.py loss -- .venv/bin/python bench/loss.py
    -> bench/results/loss_<UTC date>.txt: a header (command, date, commit, machine), then the output

Every figure the README quotes comes from such a file, so a reader can check a number without
rerunning it. The output is streamed as it comes; the exit status is the benchmark's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=ROOT, check=False
        ).stdout.strip()

    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    return (git("rev-parse", "HEAD") or "unknown") + dirty


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
        versions = f"torch {torch.__version__}"
    except ImportError:
        versions = "torch not installed"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.node()}: {os.cpu_count()} cores ({cpu}){gpu}; Python {platform.python_version()}, "
        f"{versions}; load average at start {load}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", help="the results file's name (bench/results/<name>_<date>.txt)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark's command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark's command after --")
    now = datetime.datetime.now(datetime.UTC)
    out = ROOT / "bench" / "results" / f"{args.name}_{now:%Y-%m-%d}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = [
        f"# command: {' '.join(command)}",
        f"# date: {now:%Y-%m-%dT%H:%M:%SZ}",
        f"# commit: {_commit()}",
        f"# machine: {_machine()}",
        "",
    ]
    with out.open("w") as f:
        f.write("\n".join(header) + "\n")
        f.flush()
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        code = proc.wait()
        f.write(f"\n# exit status: {code}\n")
    print(f"record: {out}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
