"""Run a benchmark and keep its whole output under ``bench/results/``, with machine, date and commit.

    .venv/bin/python bench/record.py loss -- .venv/bin/python bench/loss.py
    -> bench/results/loss_<UTC date>.txt: a header (command, date, commit, machine), then the output

Every figure the docs quote comes from such a file, so a reader can check a number without
rerunning it, and the commit in its header is the code that produced it: a tree with uncommitted
changes to tracked files is refused (untracked files do not count). ``--allow-dirty`` records
anyway and says so in the file's commit line, with the changed paths. The output is streamed as
it comes; the exit status is the benchmark's (2 when recording is refused).
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
REFUSED = 2
"""Exit status when the tree cannot be recorded (uncommitted changes, or no commit to name)."""


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False)


def tracked_changes() -> list[str]:
    """The tracked files that differ from ``HEAD`` (staged or not), as ``git status --porcelain`` lines."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status.returncode != 0:
        raise RuntimeError(f"git status failed in {ROOT}: {status.stderr.strip()}")
    return [line for line in status.stdout.splitlines() if line.strip()]


def head_commit() -> str:
    """``HEAD``'s full hash; raises when ``ROOT`` is not a git work tree with a commit."""
    head = _git("rev-parse", "--verify", "HEAD")
    if head.returncode != 0:
        raise RuntimeError(f"no commit to name in {ROOT}: {head.stderr.strip()}")
    return head.stdout.strip()


def commit_line(allow_dirty: bool) -> str:
    """The header's commit: ``HEAD``, or an error naming the changed files unless ``allow_dirty``."""
    commit = head_commit()
    changes = tracked_changes()
    if not changes:
        return commit
    if not allow_dirty:
        listed = "\n".join(f"  {line}" for line in changes)
        raise RuntimeError(
            f"refusing to record from a tree with uncommitted changes to tracked files:\n{listed}\n"
            "A recorded figure must name the commit that produced it: commit these changes first, "
            "or pass --allow-dirty to record anyway (the file's commit line then says so)."
        )
    paths = ", ".join(line[3:] for line in changes)
    return f"{commit} (with uncommitted changes, recorded with --allow-dirty: {paths})"


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        usage="record.py [--allow-dirty] NAME -- COMMAND ...",
    )
    parser.add_argument("name", help="the results file's name (bench/results/<name>_<date>.txt)")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="record even with uncommitted changes to tracked files (written into the file)",
    )
    if "--" not in argv:
        parser.error("give the benchmark's command after --")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        parser.error("give the benchmark's command after --")
    try:
        commit = commit_line(args.allow_dirty)
    except RuntimeError as err:
        print(f"record: {err}", file=sys.stderr)
        return REFUSED
    now = datetime.datetime.now(datetime.UTC)
    out = ROOT / "bench" / "results" / f"{args.name}_{now:%Y-%m-%d}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    header = [
        f"# command: {' '.join(command)}",
        f"# date: {now:%Y-%m-%dT%H:%M:%SZ}",
        f"# commit: {commit}",
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
