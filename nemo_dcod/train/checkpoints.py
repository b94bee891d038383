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
(by global step in the folder name, then modification time) is used.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

__all__ = ["checkpoint_problem", "newest_complete_checkpoint"]

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


def newest_complete_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint folder in ``directory`` (None if there is none)."""
    if not directory.is_dir():
        return None
    candidates = sorted((p for p in directory.iterdir() if p.is_dir()), key=_order, reverse=True)
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        _LOG.warning("checkpoint %s is incomplete and is skipped: %s", path, problem)
        print(f"warning: skipping incomplete checkpoint {path}: {problem}", flush=True)
    return None
