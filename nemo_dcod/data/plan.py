"""What a run needs to know of a store before it starts: from its manifest, or from a plan.

``train`` and ``score`` check their config against the store they read (row length, vocabulary,
teacher columns, whether rows pack several documents). On a cluster the store often does not
exist yet when the jobs are submitted: the chain's first job writes it. Each stage's dry run then
checks against a **store plan** instead, a small JSON file of the same facts that the dry runs of
the stages before it wrote (``prepare --dry-run --store-plan F`` from its config and tokenizer,
``score --dry-run --store-plan F`` adds the teacher columns it will write), so that a chain a run
would refuse at start is refused at submission.

:class:`StoreFacts` is that set of facts; :func:`store_facts` reads a complete store's manifest,
or the plan when no store is there.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PLAN_FORMAT", "StoreFacts", "store_facts", "write_plan"]

PLAN_FORMAT = "nemo_dcod.store_plan"


@dataclass(frozen=True)
class StoreFacts:
    """The facts of a store that runs check their config against.

    Attributes:
        seq_length: tokens per row.
        vocab_size: the tokenizer's size.
        pad_token_id: the padding token.
        packed: rows may hold several documents (False: one document per row, padded).
        teacher_logprobs: who wrote the ``teacher_logprobs`` column: ``generation`` (the engine's
            log-probs in the traces), ``teacher`` or ``reference`` (``score``), or None (absent).
        topk: teacher top-k entries per position (0: none).
        source: where the facts come from (the manifest, or the plan file and its writers).
    """

    seq_length: int
    vocab_size: int
    pad_token_id: int
    packed: bool
    teacher_logprobs: str | None
    topk: int
    source: str

    @classmethod
    def of_manifest(cls, manifest: dict[str, Any], source: str) -> StoreFacts:
        """The facts of a complete store's ``manifest.json``."""
        counts = manifest.get("counts", {})
        columns = manifest.get("columns", {})
        teacher = manifest.get("teacher") or {}
        packing = (manifest.get("settings") or {}).get("packing")
        packed = packing != "none" and int(counts.get("documents", 0)) > int(counts.get("rows", 0))
        return cls(
            seq_length=int(manifest["seq_length"]),
            vocab_size=int(manifest["vocab_size"]),
            pad_token_id=int(manifest["pad_token_id"]),
            packed=packed,
            teacher_logprobs=teacher.get("logprobs") if columns.get("teacher_logprobs") else None,
            topk=int(teacher.get("topk") or 0) if columns.get("teacher_topk_ids") else 0,
            source=source,
        )

    def with_scoring(self, what: str, topk: int, by: str) -> StoreFacts:
        """The facts once ``score`` has written its columns."""
        return dataclasses.replace(self, teacher_logprobs=what, topk=topk, source=f"{self.source} + {by}")


def store_facts(store: str | Path, plan: str | Path | None = None) -> StoreFacts:
    """The store's facts: its manifest when the store is complete, else the plan file.

    Raises:
        ValueError: neither a complete store nor a readable plan, naming what to do.
    """
    from nemo_dcod.data.store import read_manifest

    manifest_path = Path(store) / "manifest.json"
    if manifest_path.is_file():
        try:
            return StoreFacts.of_manifest(read_manifest(store), str(manifest_path))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise ValueError(f"store {store}: {exc}") from exc
    if plan is None:
        raise ValueError(
            f"{store}: no manifest.json, not a complete store: run `nemo-dcod prepare` first (re-run it "
            "to resume an unfinished one), or dry-run with --store-plan FILE written by the dry runs of "
            "the stages that will make it."
        )
    try:
        data = json.loads(Path(plan).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"--store-plan {plan}: unreadable ({exc}); `nemo-dcod prepare --dry-run --store-plan {plan}` "
            "writes it."
        ) from exc
    if data.get("format") != PLAN_FORMAT:
        raise ValueError(f"--store-plan {plan}: not a store plan (format {data.get('format')!r}).")
    names = {f.name for f in dataclasses.fields(StoreFacts)}
    try:
        return StoreFacts(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise ValueError(f"--store-plan {plan}: {exc}; rewrite it with prepare's dry run.") from exc


def write_plan(path: str | Path, facts: StoreFacts) -> None:
    """Write ``facts`` as a store plan (atomically)."""
    from nemo_dcod.data.store import write_json_atomic

    write_json_atomic(Path(path), {"format": PLAN_FORMAT, **dataclasses.asdict(facts)})
