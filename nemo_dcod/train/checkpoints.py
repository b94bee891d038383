"""Which checkpoint a run resumes from: the newest *complete* one, skipping any cut off mid-write.

NeMo's ``AutoResume(resume_if_exists=True)`` only looks at the ``*-last`` checkpoint and raises if it
is unfinished, and a folder truncated by a killed writer (no NeMo marker left behind) is not
detected at all. Here a NeMo 2 checkpoint ``<ckpt>/{context,weights}`` counts as complete when:

* no ``<ckpt>-unfinished`` marker (NeMo's ``ModelCheckpoint`` writes one before saving and removes
  it after) sits beside it;
* ``context/io.json`` exists (the model and trainer recipe);
* ``weights/`` holds the distributed checkpoint's ``metadata.json``, ``.metadata`` and
  ``common.pt``, and every shard file the ``.metadata`` index points to exists and is at least as
  long as the last byte range stored in it.

Incomplete folders are skipped with a warning that names what is missing; the newest complete one
(by global step in the folder name, then modification time) is used. Symbolic links are passed
over: ``train`` saves each step once and makes ``*-last`` a link to that step's folder
(``save_last="link"``), so the folder itself is the one chosen, whatever order the directory
lists. Each rank looks before NeMo starts (no process group exists yet); once it does, every rank
takes global rank 0's choice (:class:`~nemo_dcod.train.callbacks.ResumeAsRankZero`), so ranks that
see the file system in different states still restore the same checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["checkpoint_problem", "newest_complete_checkpoint", "shield_checkpoint_writer"]

_LOG = logging.getLogger(__name__)
_STEP = re.compile(r"step=(\d+)")


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete NeMo 2 checkpoint, or ``None`` when it is."""
    marker = path.parent / f"{path.name}-unfinished"
    if marker.exists():
        return f"unfinished marker {marker.name} (the save did not complete)"
    if not (path / "context" / "io.json").is_file():
        return "context/io.json missing"
    weights = path / "weights"
    for name in ("metadata.json", ".metadata", "common.pt"):
        if not (weights / name).is_file():
            return f"weights/{name} missing"
    try:
        with (weights / ".metadata").open("rb") as f:
            metadata = pickle.load(f)
    except Exception as exc:  # a truncated pickle raises one of several errors
        return f"weights/.metadata unreadable ({type(exc).__name__}: {exc})"
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        needed[rel] = max(needed.get(rel, 0), end)
    for rel, end in sorted(needed.items()):
        shard = weights / rel
        if not shard.is_file():
            return f"weights/{rel} missing"
        if shard.stat().st_size < end:
            return f"weights/{rel} truncated ({shard.stat().st_size} < {end} bytes)"
    return None


def _order(path: Path) -> tuple[int, float]:
    match = _STEP.search(path.name)
    return (int(match.group(1)) if match else -1, path.stat().st_mtime)


def newest_complete_checkpoint(
    directory: Path, problem_of: Callable[[Path], str | None] | None = None
) -> Path | None:
    """The newest complete checkpoint folder in ``directory`` (None if there is none).

    Args:
        directory: ``<run_dir>/checkpoints``.
        problem_of: the completeness check (default :func:`checkpoint_problem`; tests give one
            rank another view through :class:`~nemo_dcod.train.hooks.TrainHooks`).
    """
    if not directory.is_dir():
        return None
    check = problem_of or checkpoint_problem
    folders = (p for p in directory.iterdir() if p.is_dir() and not p.is_symlink())
    candidates = sorted(folders, key=_order, reverse=True)
    for path in candidates:
        problem = check(path)
        if problem is None:
            return path
        _LOG.warning("checkpoint %s is incomplete and is skipped: %s", path, problem)
        print(f"warning: skipping incomplete checkpoint {path}: {problem}", flush=True)
    return None


def _writer_server_init(parent: int) -> None:
    """Run in megatron-core's results-queue server: survive the preemption signals, not the rank.

    The signals that ask a rank to checkpoint (SIGTERM, SIGUSR1) reach every process of a Slurm
    step, this server included; it ignores them, and exits by itself once the rank that started it
    is gone (it has no other way to learn of a SIGKILLed rank).
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def shield_checkpoint_writer() -> None:
    """Start megatron-core's checkpoint results queue in a server that preemption signals spare.

    megatron-core's ``FileSystemWriterAsync`` (which NeMo's checkpoint IO uses for every save,
    synchronous ones too) collects each save's write results through a queue served by a
    ``multiprocessing`` manager process it spawns on first use
    (``filesystem_async._get_write_results_queue``). Slurm signals every process of a step at
    preemption or ``--signal=USR1@...``; that fresh interpreter has the default handlers, so it
    dies, and the very checkpoint the signal asks for fails (``BrokenPipeError`` in the writer,
    then a dead peer in every other rank's barrier). Called in each rank before training, this
    starts that queue's server with the signals ignored
    (``tests/distributed/test_train_resume.py``, every rank signalled). A no-op when a queue exists.
    """
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is not None:
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_writer_server_init, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive
