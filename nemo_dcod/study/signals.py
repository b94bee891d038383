"""The program teacher's exact top-k, written into a prepared store as ``score`` would write it.

``prepare`` stores the log-prob of each trace token (from the traces, as an engine reports them);
the top-k losses (``kl``, ``todi``, DisCorD's ``kl`` base) also need the teacher's K most probable
next tokens at every trained position. A real teacher gets them from ``nemo-dcod score``; the
program teacher's next-token distribution is known exactly for any prefix, so here they are
computed from it: per trained position, the K most probable ids of ``p(. | problem, prefix)``
(ties to the smaller id, as ``score`` breaks them) and their log-probs, in float64, stored as
float32.

The columns have the store's own layout (``teacher_topk_ids`` int32 and ``teacher_topk_logprobs``
float32, ``[R, S, K]``, label-aligned); each is saved to a temp file and renamed into its shard,
and the manifest (rewritten atomically, last) lists them, so a reader sees either no top-k or all
of it. Positions that are not trained hold ids 0..K-1 at log(1/K), never read by a loss.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nemo_dcod.demo.teacher import ProgramTeacher, TeacherTrace
from nemo_dcod.study.config import StudyError

__all__ = ["document_topk", "write_teacher_topk"]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def document_topk(teacher: ProgramTeacher, trace: TeacherTrace, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k after every prefix of ``trace``'s response.

    Returns:
        ``[T, K]`` int32 ids and ``[T, K]`` float32 log-probs, T = the response's length (row t:
        the distribution of response token t given tokens ``< t``).
    """
    ids = np.empty((len(trace.token_ids), k), dtype=np.int32)
    logprobs = np.empty((len(trace.token_ids), k), dtype=np.float32)
    order_ids = np.arange(len(teacher.vocab))
    for t in range(len(trace.token_ids)):
        p = teacher.distribution(trace.problem, trace.token_ids[:t])
        top = np.lexsort((order_ids, -p))[:k]  # most probable first, ties to the smaller id
        if p[top[-1]] <= 0:
            raise StudyError(
                f"training.topk={k}: the teacher gives only {int((p > 0).sum())} tokens a probability > 0; "
                "lower training.topk."
            )
        ids[t] = top
        logprobs[t] = np.log(p[top])
    return ids, logprobs


def _shard_columns(
    where: Path, traces: Sequence[TeacherTrace], teacher: ProgramTeacher, k: int
) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.load(where / "tokens.npy")
    mask = np.load(where / "loss_mask.npy")
    documents = np.load(where / "documents.npy")
    rows, seq = tokens.shape
    ids = np.broadcast_to(np.arange(k, dtype=np.int32), (rows, seq, k)).copy()
    logprobs = np.full((rows, seq, k), -math.log(k), dtype=np.float32)
    for row, start, length, index in documents.tolist():
        trace = traces[index]
        positions = [p for p in range(start, start + length - 1) if mask[row, p]]
        labels = [int(tokens[row, p + 1]) for p in positions]
        if labels != list(trace.token_ids):
            raise StudyError(
                f"{where}: document {index} (row {row}) trains on tokens {labels[:8]}..., not the teacher's "
                f"response {trace.token_ids[:8]}...: the store does not hold these traces."
            )
        doc_ids, doc_logprobs = document_topk(teacher, trace, k)
        ids[row, positions] = doc_ids
        logprobs[row, positions] = doc_logprobs
    return ids, logprobs


def write_teacher_topk(
    store: Path, traces: Sequence[TeacherTrace], teacher: ProgramTeacher, k: int
) -> dict[str, Any]:
    """Add the exact top-k columns of every shard of ``store`` and list them in its manifest.

    Args:
        store: a complete store prepared from ``traces`` (one input file, in this order).
        traces: the teacher's traces, by record index.
        teacher: the program teacher that wrote them.
        k: entries per position (at most the number of tokens the teacher can write).

    Returns:
        the rewritten manifest.

    Raises:
        StudyError: the store's documents are not these traces, or k exceeds the teacher's support.
    """
    from nemo_dcod.data.store import PackedStore, read_manifest, write_json_atomic

    manifest = read_manifest(store)
    for shard in manifest["shards"]:
        where = store / "shards" / shard["name"]
        ids, logprobs = _shard_columns(where, traces, teacher, k)
        _save_atomic(where / "teacher_topk_ids.npy", ids)
        _save_atomic(where / "teacher_topk_logprobs.npy", logprobs)
    rows, seq = int(manifest["counts"]["rows"]), int(manifest["seq_length"])
    manifest["columns"]["teacher_topk_ids"] = {"dtype": "int32", "shape": [rows, seq, k]}
    manifest["columns"]["teacher_topk_logprobs"] = {"dtype": "float32", "shape": [rows, seq, k]}
    manifest["teacher"] = {**(manifest.get("teacher") or {}), "topk": k, "topk_by": "program teacher (exact)"}
    write_json_atomic(store / "manifest.json", manifest)
    PackedStore(store)  # what training opens: complete, every listed column as the manifest says
    return json.loads((store / "manifest.json").read_text())
