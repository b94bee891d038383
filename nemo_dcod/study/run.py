"""``nemo-dcod study``: plan the jobs, run what is missing, write the report.

Layout of a study's ``run_dir`` (shared by every config that names it)::

    study.json                           marks the folder as a study's (nothing else is ever deleted)
    configs/<name>.yaml                  the resolved config the jobs read
    seeds/seed_<n>-<key>/                a seed's shared part (:mod:`.seeds`); prep.json last
    students/seed_<n>/<label>-<key>/     one student on one seed (:mod:`.student`); summary.json last
    jobs/, logs/                         each job's spec and log
    report_<name>/                       summary.json, summary.md, study.png, weights.png

A key hashes everything that changes a folder's content, so a finished folder is reused exactly
when the same work is asked for again (by a rerun, or by another config) and a changed setting gets
a new folder instead of overwriting. Unfinished folders (no prep.json / summary.json) are redone.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nemo_dcod.config import to_yaml
from nemo_dcod.losses.registry import label_of
from nemo_dcod.study.config import StudyConfig, StudyError
from nemo_dcod.study.jobs import Job, run_jobs

__all__ = ["MARKER", "provenance", "run_study", "seed_dir", "student_dir"]

MARKER = "study.json"
PREP_VERSION = 2
"""Bumped when what a seed's folder holds changes meaning (old folders are then not reused).
2: the warm start's training reads its rows shuffled (``data.shuffle``)."""
STUDENT_VERSION = 2
"""Bumped when what a student's summary holds changes meaning. 2: rows shuffled, DisCorD's carried
ḡ paired with its b."""


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


_TASK_KEYS = (
    "num_ops",
    "modulus",
    "num_train_problems",
    "num_eval_problems",
    "shortcut_prob",
    "step_error",
    "shortcut_error",
    "teacher_noise",
    "seq_length",
)
_WARM_KEYS = ("kind", "warm_num_ops", "warm_problems", "warm_steps", "warm_lr")
_TRAINING_KEYS = (
    "steps",
    "global_batch_size",
    "lr",
    "hidden_size",
    "ffn_hidden_size",
    "tensor_model_parallel_size",
    "topk",
)
_EVALUATION_KEYS = ("num_samples", "temperature", "exposure_samples")
# The fields that make a folder's content. A field added to a section later goes here only if it
# changes results, and with its default left out of the key; otherwise every folder is redone.


def _fields(section: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(section, name) for name in names}


def _seed_key(cfg: StudyConfig, seed: int) -> str:
    start = _fields(cfg.start, _WARM_KEYS) if cfg.start.kind == "warm" else {"kind": "random"}
    sizes = _fields(cfg.training, ("hidden_size", "ffn_hidden_size", "global_batch_size", "topk"))
    if not cfg.training.shuffle:  # keyed only when off: the folders made before the field stay valid
        sizes["shuffle"] = False
    task = _fields(cfg.task, _TASK_KEYS)
    return _key({"v": PREP_VERSION, "task": task, "start": start, "sizes": sizes, "seed": seed})


def seed_dir(cfg: StudyConfig, seed: int) -> Path:
    """The folder of a seed's shared part (``cfg`` resolved)."""
    return Path(cfg.run_dir).resolve() / "seeds" / f"seed_{seed}-{_seed_key(cfg, seed)}"


def student_dir(cfg: StudyConfig, seed: int, section: dict[str, Any]) -> Path:
    """The folder of one student on one seed (``cfg`` resolved)."""
    content = {
        "v": STUDENT_VERSION,
        "seed": _seed_key(cfg, seed),
        "loss": {k: v for k, v in section.items() if k != "label"},
        "training": _fields(cfg.training, _TRAINING_KEYS + (() if cfg.training.shuffle else ("shuffle",))),
        "evaluation": _fields(cfg.evaluation, _EVALUATION_KEYS),
    }
    return Path(cfg.run_dir).resolve() / "students" / f"seed_{seed}" / f"{label_of(section)}-{_key(content)}"


def _lock(run_dir: Path) -> Any:
    """Hold ``run_dir``'s lock for this process's life: one study at a time plans and runs in a folder
    (a second would take the first's unfinished folders for abandoned ones and redo them).

    Raises:
        StudyError: another study holds it.
    """
    import fcntl

    handle = (run_dir / "study.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise StudyError(
            f"run_dir={run_dir}: another study is running there ({handle.read().strip() or 'pid unknown'}); "
            "wait for it to finish (finished students are then reused), or use another run_dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def _claim(run_dir: Path, name: str) -> None:
    """Make ``run_dir`` a study's folder; refuse one that holds something else."""
    mine = (MARKER, "demo.json", "study.lock")
    foreign = run_dir.exists() and any(p.name not in mine for p in run_dir.iterdir())
    if foreign and not (run_dir / MARKER).is_file():
        raise StudyError(
            f"run_dir={run_dir} exists, is not empty and holds no {MARKER} (not a study's folder): "
            "choose another run_dir."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / MARKER).is_file():
        (run_dir / MARKER).write_text(json.dumps({"created_by": f"nemo-dcod study ({name})"}) + "\n")


def _commit() -> str:
    if os.environ.get("NEMO_DCOD_COMMIT"):  # a snapshot of a commit, run outside its checkout
        return os.environ["NEMO_DCOD_COMMIT"]
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, check=False)
        return out.stdout.strip()

    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    return (git("rev-parse", "HEAD") or "unknown") + dirty


def provenance(started: float, date: datetime.datetime, load: tuple[float, ...]) -> dict[str, Any]:
    """Command, date, commit, machine and wall time of a run (what the report says it ran on)."""
    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "command": " ".join(["nemo-dcod", *sys.argv[1:]]) if sys.argv else "",
        "date": f"{date:%Y-%m-%dT%H:%M:%SZ}",
        "commit": _commit(),
        "machine": f"{platform.node()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}",
        "load_average_at_start": list(load),
        "load_average_at_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - started,
    }


def _jobs(
    cfg: StudyConfig, run_dir: Path, config_path: Path
) -> tuple[list[Job], dict[str, tuple[int, dict[str, Any], Path]]]:
    """The jobs still to run (finished work skipped) and every (student, seed)'s folder."""
    from nemo_dcod.study.seeds import read_prep
    from nemo_dcod.study.student import read_summary

    jobs: list[Job] = []
    places: dict[str, tuple[int, dict[str, Any], Path]] = {}

    def add(name: str, spec: dict[str, Any], done: Any, deps: list[str]) -> None:
        path = run_dir / "jobs" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**spec, "config": str(config_path)}, indent=1) + "\n")
        jobs.append(Job(name, path, run_dir / "logs" / f"{name}.log", done, deps))

    for seed in cfg.seeds:
        where = seed_dir(cfg, seed)
        prep_name = f"prep_{where.name}"
        if read_prep(where) is None:
            add(
                prep_name,
                {"kind": "prep", "seed": seed, "where": str(where)},
                lambda w=where: read_prep(w) is not None,
                [],
            )
        for section in cfg.students:
            mine = student_dir(cfg, seed, section)
            name = f"seed_{seed}_{mine.name}"
            places[name] = (seed, section, mine)
            if read_summary(mine) is not None:
                continue
            if mine.exists():
                shutil.rmtree(mine)  # unfinished: made again from the start
            spec = {
                "kind": "student",
                "seed": seed,
                "section": section,
                "where": str(mine),
                "seed_dir": str(where),
            }
            deps = [prep_name] if read_prep(where) is None else []
            add(name, spec, lambda m=mine: read_summary(m) is not None, deps)
    return jobs, places


def _log(started: float) -> Any:
    def log(message: str) -> None:
        print(f"[study {time.perf_counter() - started:7.1f}s] {message}", flush=True)

    return log


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """Run every missing job of the study, then write and print its report.

    Returns:
        the report's summary (also ``<run_dir>/report_<name>/summary.json``).

    Raises:
        StudyError: run_dir holds something other than a study, or a job failed (after the report
            of what did finish is written; the message names each failed job and its log).
    """
    from nemo_dcod.study.seeds import read_prep
    from nemo_dcod.study.student import read_summary

    started, date, load = time.perf_counter(), datetime.datetime.now(datetime.UTC), os.getloadavg()
    log = _log(started)
    res = cfg.resolved()
    run_dir = Path(res.run_dir).resolve()
    _claim(run_dir, res.name)
    lock = _lock(run_dir)
    config_path = run_dir / "configs" / f"{res.name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(f"# nemo-dcod study --config {config_path}\n" + to_yaml(res))
    jobs, places = _jobs(res, run_dir, config_path)
    log(
        f"{len(res.students)} student(s) x {len(res.seeds)} seed(s); {len(jobs)} job(s) to run, "
        f"{res.parallel} at once"
    )
    outcome = run_jobs(jobs, res.parallel, log)
    summaries: dict[str, dict[int, dict[str, Any]]] = {}
    missing = []
    for name, (seed, section, where) in places.items():
        found = read_summary(where)
        if found is not None:
            summaries.setdefault(label_of(section), {})[seed] = found
        else:
            missing.append(f"{label_of(section)} seed {seed}: {outcome.get(name, 'not run')}".split("\n")[0])
    preps = {seed: read_prep(seed_dir(res, seed)) for seed in res.seeds}
    summary = _report(res, summaries, preps, missing, provenance(started, date, load), run_dir, log)
    lock.close()
    failed = {name: text for name, text in outcome.items() if text != "done"}
    if failed:
        details = "\n".join(f"- {name}: {text}" for name, text in failed.items())
        raise StudyError(f"{len(failed)} job(s) did not finish (the report covers the others):\n{details}")
    return summary


def _report(
    cfg: StudyConfig,
    summaries: dict[str, dict[int, dict[str, Any]]],
    preps: dict[int, dict[str, Any] | None],
    missing: list[str],
    prov: dict[str, Any],
    run_dir: Path,
    log: Any,
) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from nemo_dcod.study.plots import plot_study
    from nemo_dcod.study.report import TEST, aggregate, render_tables, write_json

    sections = {label_of(s): s for s in cfg.students}
    out_dir = run_dir / f"report_{cfg.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "study": cfg.name,
        "task": cfg.task.preset,
        "start": cfg.start.kind,
        "baseline": cfg.baseline,
        "seeds": list(cfg.seeds),
        "test": TEST,
        "provenance": prov,
        "config": OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))),
        "seed_info": {
            str(s): ({k: p[k] for k in ("teacher", "prepare", "start")} if p else None)
            for s, p in preps.items()
        },
        **aggregate(sections, summaries, cfg.baseline),
        "missing": missing,
    }
    write_json(out_dir / "summary.json", summary)
    summary = json.loads((out_dir / "summary.json").read_text())  # the tables show the JSON's numbers
    text = render_tables(summary)
    (out_dir / "summary.md").write_text(text)
    first = cfg.seeds[0]
    curves = {label: runs[first]["losses"] for label, runs in summaries.items() if first in runs}
    files = [out_dir / "summary.json", out_dir / "summary.md", *plot_study(summary, curves, out_dir)]
    if cfg.results_dir:
        published = Path(cfg.results_dir) / f"study_{cfg.name}_{prov['date'][:10]}"
        published.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, published / f.name)
        files.append(published)
    print("\n" + text)
    for f in files:
        print(f"  {f}")
    log(f"done: report in {out_dir}")
    return summary
