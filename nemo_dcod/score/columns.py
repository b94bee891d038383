"""Scoring's writes into the store: per-shard columns, atomically, then the manifest.

Per shard, the writer rank (tensor-parallel rank 0 of its replica's last pipeline stage) removes
the shard's ``score.json``, writes each column to a temp file and renames it into place, then
writes ``score.json`` with the run's key: a shard is scored exactly when its ``score.json`` has the
key and its columns the right shapes (:func:`shard_done`). A process killed anywhere in between
leaves a shard that a rerun scores again; ``scoring.json`` in the store's root marks the whole store
incomplete from the first write until :func:`finish` has rewritten the manifest.

``on_write`` is the tests' fault-injection point: called with an event (``column_saved``,
``shard_written``) and the shard's name after each step of a write.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from nemo_dcod.data.store import SCORING_MARKER, PackedStore, read_manifest, write_json_atomic
from nemo_dcod.score.config import ScoreConfig
from nemo_dcod.score.plan import ScoreError, ScorePlan, checkpoint_identity

__all__ = ["WriteHook", "clean_temp_files", "finish", "shard_done", "write_shard_columns"]

WriteHook = Callable[[str, str], None]
"""``(event, shard name)``: called after each step of a shard's write (tests inject faults here)."""


def shard_done(store: Path, shard: str, key: str, rows: int, seq: int, topk: int) -> bool:
    """Whether ``shard`` holds this run's columns: its ``score.json`` has ``key``, the shapes fit."""
    where = store / "shards" / shard
    try:
        if json.loads((where / "score.json").read_text()).get("key") != key:
            return False
        shapes: dict[str, tuple[int, ...]] = {"teacher_logprobs": (rows, seq)}
        if topk:
            shapes.update(teacher_topk_ids=(rows, seq, topk), teacher_topk_logprobs=(rows, seq, topk))
        return all(np.load(where / f"{n}.npy", mmap_mode="r").shape == s for n, s in shapes.items())
    except (OSError, ValueError):
        return False


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_shard_columns(
    where: Path, columns: dict[str, np.ndarray], info: dict[str, Any], on_write: WriteHook | None = None
) -> None:
    """Each column to a temp file renamed into place, then ``score.json`` last."""
    (where / "score.json").unlink(missing_ok=True)  # until the new columns are all in place
    for name, array in columns.items():
        _save_atomic(where / f"{name}.npy", array)
        if on_write is not None:
            on_write("column_saved", where.name)
    write_json_atomic(where / "score.json", info)
    if on_write is not None:
        on_write("shard_written", where.name)


def finish(plan: ScorePlan, cfg: ScoreConfig) -> dict[str, Any]:
    """Check every shard has this run's columns, then the manifest, then remove the marker."""
    store_path = Path(plan.store)
    manifest = read_manifest(store_path, scoring=True)
    seq = int(manifest["seq_length"])
    missing = [
        s["name"]
        for s in manifest["shards"]
        if not shard_done(store_path, s["name"], plan.key, int(s["rows"]), seq, plan.topk)
    ]
    if missing:
        raise ScoreError(
            f"store={cfg.store}: {len(missing)} shard(s) lack this run's columns after scoring "
            f"({missing[:3]}): re-run the same command."
        )
    rows = int(manifest["counts"]["rows"])
    columns = dict(manifest["columns"])
    columns["teacher_logprobs"] = {"dtype": "float32", "shape": [rows, seq]}
    for name, dtype in (("teacher_topk_ids", "int32"), ("teacher_topk_logprobs", "float32")):
        columns[name] = {"dtype": dtype, "shape": [rows, seq, plan.topk]} if plan.topk else None
    manifest["columns"] = columns
    manifest["teacher"] = {
        "logprobs": plan.what,
        "topk": plan.topk,
        "checkpoint": plan.checkpoint,
        "checkpoint_identity": checkpoint_identity(Path(plan.checkpoint)),
        "dtype": plan.dtype,
        "key": plan.key,
    }
    write_json_atomic(store_path / "manifest.json", manifest)
    (store_path / SCORING_MARKER).unlink(missing_ok=True)
    PackedStore(store_path)  # what training will open: complete, every column as listed
    return manifest


def clean_temp_files(store: Path) -> None:
    """Remove the temp files a killed run left in the shards."""
    for stale in (store / "shards").glob("*/.*.tmp"):
        stale.unlink(missing_ok=True)  # left by a killed run
