"""The trace shards on disk: planning, keys, atomic writes, and what a rerun may skip.

Layout of ``out_dir`` (format :data:`TRACES_FORMAT`, version :data:`TRACES_VERSION`)::

    traces/shard-00000.jsonl   one trace a line (what ``nemo-dcod prepare`` reads); written to a
                               hidden temp file beside it, then renamed
    meta/shard-00000.json      written after the shard's rename: its key, sampling settings,
                               teacher, counts; a shard without it (or with another key) is not done
    config.yaml                the resolved config of the last run
    report.json, prepare.yaml  once every shard is done (see :mod:`nemo_dcod.generate.report`)

**Shards.** Problems (in input order) are cut into shards of ``problems_per_shard``; shard ``i``
belongs to worker ``i % num_workers``, so workers never share a file and need no coordination. A
shard's content depends only on its problems and the settings (its sampling seed is derived from
``sampling.seed`` and ``i``), never on the worker count or on what ran before.

**Resume.** A shard is done when its meta file exists with this run's key and its trace file has
the recorded size. A process killed mid-shard leaves at most a ``.shard-*.tmp`` file (never read,
removed when the shard is redone) and no meta; a rerun redoes exactly the shards not done. A done
shard whose key differs (other problems, teacher or settings) is an error unless ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_dcod.data.store import write_json_atomic
from nemo_dcod.generate.config import GenerateError
from nemo_dcod.generate.problems import TraceProblem

__all__ = [
    "TRACES_FORMAT",
    "TRACES_VERSION",
    "ShardPlan",
    "clean_temp_files",
    "meta_path",
    "plan_shards",
    "read_meta",
    "shard_done",
    "teacher_identity",
    "trace_path",
    "write_trace_shard",
]

TRACES_FORMAT = "nemo_dcod.traces"
TRACES_VERSION = 1
_IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class ShardPlan:
    """One unit of work: a slice of the problems, its key and its sampling seed."""

    index: int
    start: int
    """The first problem's position in the run's problem list."""
    problems: list[TraceProblem]
    key: str
    """sha256 of the format, the content settings, the teacher's identity and these problems."""
    seed: int


def trace_path(out_dir: Path, index: int) -> Path:
    """``out_dir/traces/shard-<index>.jsonl``."""
    return out_dir / "traces" / f"shard-{index:05d}.jsonl"


def meta_path(out_dir: Path, index: int) -> Path:
    """``out_dir/meta/shard-<index>.json``."""
    return out_dir / "meta" / f"shard-{index:05d}.json"


def teacher_identity(teacher: str, tokenizer: str | None) -> dict[str, Any]:
    """What identifies the teacher in a shard's key: sha256 of its config, generation config and
    tokenizer files, and the name and size of every weight file (hashing the weights themselves
    would read 141 GB for a 70B teacher)."""
    out: dict[str, Any] = {}
    for label, directory in (("teacher", teacher), ("tokenizer", tokenizer or teacher)):
        root = Path(directory)
        for name in _IDENTITY_FILES:
            f = root / name
            if f.is_file():
                out[f"{label}/{name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    weights = sorted(p for p in Path(teacher).iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    out["weights"] = [(p.name, p.stat().st_size) for p in weights]
    return out


def shard_seed(seed: int, index: int) -> int:
    """A 31-bit seed for shard ``index`` of a run seeded ``seed``."""
    digest = hashlib.sha256(f"nemo_dcod.generate:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def plan_shards(
    problems: list[TraceProblem],
    per_shard: int,
    settings: dict[str, Any],
    identity: dict[str, Any],
    seed: int,
) -> list[ShardPlan]:
    """Cut ``problems`` into shards of ``per_shard`` (the last one may be shorter)."""
    common = json.dumps(
        {"format": TRACES_FORMAT, "version": TRACES_VERSION, "settings": settings, "teacher": identity},
        sort_keys=True,
    )
    out = []
    for index, start in enumerate(range(0, len(problems), per_shard)):
        chunk = problems[start : start + per_shard]
        h = hashlib.sha256(common.encode())
        h.update(json.dumps([(p.id, p.text, p.reference) for p in chunk]).encode())
        out.append(ShardPlan(index, start, chunk, h.hexdigest(), shard_seed(seed, index)))
    return out


def read_meta(out_dir: Path, index: int) -> dict[str, Any] | None:
    """The shard's meta, or None when it has none (or an unreadable one: a torn write is not done)."""
    path = meta_path(out_dir, index)
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("format") == TRACES_FORMAT else None


def shard_done(out_dir: Path, plan: ShardPlan, overwrite: bool) -> bool:
    """Whether ``plan``'s shard is finished with this key (see the module docstring).

    Raises:
        GenerateError: finished with another key, and not ``overwrite``.
    """
    meta = read_meta(out_dir, plan.index)
    if meta is None:
        return False
    traces = trace_path(out_dir, plan.index)
    if meta.get("key") != plan.key:
        if overwrite:
            return False
        raise GenerateError(
            f"{meta_path(out_dir, plan.index)}: shard {plan.index} was generated from other problems, "
            "another teacher or other settings than this run's; set overwrite=true to regenerate it, or "
            "choose another out_dir."
        )
    return traces.is_file() and traces.stat().st_size == meta.get("bytes")


def clean_temp_files(out_dir: Path, index: int) -> None:
    """Remove the temp files a killed run left for shard ``index`` (only this shard's: other
    workers may be writing theirs)."""
    for stale in (out_dir / "traces").glob(f".shard-{index:05d}.jsonl.*.tmp"):
        stale.unlink(missing_ok=True)


def write_trace_shard(
    out_dir: Path,
    index: int,
    records: Iterable[dict[str, Any]],
    meta: dict[str, Any],
    on_record: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Write the shard's traces to a temp file, rename it into place, then write its meta.

    Args:
        records: the traces, one JSON object each.
        meta: the shard's meta; ``bytes``, ``sha256`` and ``records`` are added.
        on_record: called after each record is written (and flushed) with the count so far: a
            test hook to cut a run off mid-write.

    Returns:
        The meta as written.
    """
    final = trace_path(out_dir, index)
    final.parent.mkdir(parents=True, exist_ok=True)
    meta_path(out_dir, index).parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    h = hashlib.sha256()
    count = 0
    with open(tmp, "wb") as f:
        for record in records:
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            h.update(line)
            count += 1
            if on_record is not None:
                f.flush()
                on_record(count)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    written = {**meta, "records": count, "bytes": final.stat().st_size, "sha256": h.hexdigest()}
    write_json_atomic(meta_path(out_dir, index), written)
    return written
