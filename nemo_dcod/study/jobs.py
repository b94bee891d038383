"""A study's jobs: each one process (``python -m nemo_dcod.study.jobs SPEC``), run a few at a time.

Two kinds: ``prep`` (a seed's shared part, :mod:`.seeds`) and ``student`` (one student on one seed,
:mod:`.student`), which waits for its seed's prep. A job is its own process (and process group):
it launches ``nemo-dcod train`` and then loads the exported model, and two jobs at once overlap
one's start-up or evaluation with the other's training. Its output goes to its log; whether it
finished is read from the file it writes last (``prep.json``, ``summary.json``), never from its
exit status alone.

:func:`run_jobs` keeps ``parallel`` jobs running, in the order given, each once its dependencies
finished; a job whose dependency failed is not started. Interrupted (Ctrl-C, SIGTERM), it stops
every running job's whole process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Job", "main", "run_jobs"]


@dataclass
class Job:
    """One job: its spec file (what the process runs), its log, what it waits for."""

    name: str
    spec: Path
    log: Path
    done: Callable[[], bool]
    """Whether its output is there (read after it exits)."""
    deps: list[str] = field(default_factory=list)


def _start(job: Job) -> subprocess.Popen[bytes]:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with job.log.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "nemo_dcod.study.jobs", str(job.spec)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group: stopped as a whole (torchrun's ranks too)
        )


def _stop(running: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in running.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in running.values():
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C: the running jobs are stopped before the study exits."""
    del signum, frame
    raise KeyboardInterrupt


def run_jobs(jobs: list[Job], parallel: int, log: Callable[[str], None]) -> dict[str, str]:
    """Run ``jobs``, at most ``parallel`` at once; every job's outcome.

    Returns:
        name -> ``done``, ``failed: <exit status and log tail>``, or ``not run: <dependency> failed``.
    """
    outcome: dict[str, str] = {}
    pending = list(jobs)
    running: dict[str, subprocess.Popen[bytes]] = {}
    by_name = {job.name: job for job in jobs}
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while pending or running:
            for job in list(pending):
                failed = [d for d in job.deps if d in outcome and outcome[d] != "done"]
                if failed:
                    outcome[job.name] = f"not run: {failed[0]} failed"
                    pending.remove(job)
                elif len(running) < parallel and all(outcome.get(d) == "done" for d in job.deps):
                    log(f"start {job.name} (log {job.log})")
                    running[job.name] = _start(job)
                    pending.remove(job)
            time.sleep(0.5)
            for name, proc in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                job = by_name[name]
                if code == 0 and job.done():
                    outcome[name] = "done"
                    log(f"done  {name}")
                else:
                    outcome[name] = f"failed: exit {code}; last lines of {job.log}:\n{_tail(job.log)}"
                    log(f"FAILED {name} (exit {code}); see {job.log}")
    except KeyboardInterrupt:
        log(f"interrupted: stopping {len(running)} running job(s)")
        _stop(running)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return outcome


def _run(spec: dict[str, Any]) -> None:
    from nemo_dcod.config import load_config
    from nemo_dcod.study.config import StudyConfig
    from nemo_dcod.study.seeds import prep_seed, read_prep
    from nemo_dcod.study.student import run_student

    cfg = load_config(StudyConfig, spec["config"]).resolved()
    if spec["kind"] == "prep":
        prep_seed(cfg, int(spec["seed"]), Path(spec["where"]))
        return
    prep = read_prep(Path(spec["seed_dir"]))
    if prep is None:
        raise RuntimeError(f"{spec['seed_dir']}: the seed's prep is not finished")
    run_student(cfg, int(spec["seed"]), spec["section"], Path(spec["where"]), prep)


def main(argv: list[str] | None = None) -> int:
    """``python -m nemo_dcod.study.jobs SPEC``: run the job a spec file describes (exit 1 on failure)."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    started = time.perf_counter()
    try:
        _run(spec)
    except Exception:
        traceback.print_exc()
        return 1
    print(f"job {spec['kind']} done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
