"""Benchmark problems from local files in their public formats, and the prompts made from them.

Each format names the fields of its public release (the first key present wins, so the common
re-uploads load too):

============== ======================================= ==================================================
format         problem text                            reference answer
============== ======================================= ==================================================
gsm8k          ``question``                            after ``####`` in ``answer`` (commas dropped)
math           ``problem``                             last ``\\boxed{}`` of ``solution``
math500        ``problem``                             ``answer``
amc            ``problem``                             ``answer`` (a float in AI-MO's release: 142.0 -> 142)
aime           ``problem`` / ``question`` / ``Problem`` ``answer`` / ``Answer``
olympiadbench  ``question`` (``context`` before it)    ``final_answer``: a list, joined with ", ", ``$`` off
============== ======================================= ==================================================

Ids come from ``unique_id`` / ``id`` / ``ID`` / ``idx`` when present, else the row number; kept
metadata: ``level``, ``type``, ``subject``, ``year``, ``url`` where present.

Files: ``.jsonl`` (one object a line), ``.json`` (a list of objects), ``.parquet``, a directory
holding a Hugging Face dataset saved with ``save_to_disk``, or glob patterns of those. A path that
exists nowhere and looks like ``owner/name`` is loaded from the Hugging Face hub (needs a network).
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_dcod.eval.answers import extract_boxed, extract_gsm8k, strip_math_delimiters
from nemo_dcod.eval.config import BENCHMARK_FORMATS, EvalError

__all__ = [
    "BENCHMARK_FORMATS",
    "BenchmarkError",
    "Problem",
    "load_problems",
    "parse_problem",
    "read_records",
    "render_prompt",
]

_QUESTION_KEYS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("question",),
    "math": ("problem",),
    "math500": ("problem",),
    "amc": ("problem", "question"),
    "aime": ("problem", "question", "Problem", "Question"),
    "olympiadbench": ("question",),
}
_ANSWER_KEYS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("answer",),
    "math": ("solution",),
    "math500": ("answer",),
    "amc": ("answer",),
    "aime": ("answer", "Answer"),
    "olympiadbench": ("final_answer",),
}
_ID_KEYS = ("unique_id", "id", "ID", "idx")
_META_KEYS = ("level", "type", "subject", "year", "url", "subfield", "answer_type", "unit")


class BenchmarkError(EvalError):
    """A benchmark file that cannot be read, or a record without the fields its format needs."""


@dataclass
class Problem:
    """One benchmark problem."""

    benchmark: str
    """The benchmark's name (as configured)."""
    id: str
    """The record's id, or its row number."""
    question: str
    """The problem text (what the prompt template's ``{problem}`` becomes)."""
    reference: str
    """The reference final answer."""
    location: str
    """Where the record came from: ``file:line`` (JSONL) or ``path[row N]``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Level, subject, ... as the record has them."""


def _expand(path: str) -> list[str]:
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise BenchmarkError(f"{path}: the pattern matches no file.")
        return files
    return [path]


def _looks_like_hub_name(path: str) -> bool:
    parts = path.split("/")
    file_like = path.startswith((".", "~")) or Path(path).suffix.lower() in (".jsonl", ".json", ".parquet")
    return len(parts) == 2 and all(parts) and not file_like


def read_records(
    path: str, split: str | None = "test", subset: str | None = None
) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` for every record of ``path`` (see the module docstring for forms).

    Args:
        path: a file, a glob pattern, a saved dataset directory, or a hub name.
        split: the split of a saved ``DatasetDict`` or of a hub dataset.
        subset: a hub dataset's configuration (``main`` for ``openai/gsm8k``).

    Raises:
        BenchmarkError: a missing file, an unknown suffix, or malformed JSON (with file:line).
    """
    for file in _expand(path):
        p = Path(file)
        if p.is_dir():
            yield from _read_dataset(file, split, subset, on_disk=True)
        elif p.is_file():
            suffix = p.suffix.lower()
            if suffix == ".jsonl":
                yield from _read_jsonl(file)
            elif suffix == ".json":
                yield from _read_json(file)
            elif suffix == ".parquet":
                import pyarrow.parquet as pq

                for row, record in enumerate(pq.read_table(file).to_pylist()):
                    yield f"{file}[row {row}]", record
            else:
                raise BenchmarkError(f"{file}: unknown suffix {suffix!r}; use .jsonl, .json or .parquet.")
        elif _looks_like_hub_name(file):
            yield from _read_dataset(file, split, subset, on_disk=False)
        else:
            raise BenchmarkError(f"{file}: no such file or directory (nor a hub dataset name owner/name).")


def _read_jsonl(file: str) -> Iterator[tuple[str, Any]]:
    with open(file, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{file}:{line_no}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchmarkError(f"{file}:{line_no}: malformed JSON: {exc}") from exc


def _read_json(file: str) -> Iterator[tuple[str, Any]]:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise BenchmarkError(f"{file}: malformed JSON: {exc} (one object a line? name it .jsonl)") from exc
    if not isinstance(data, list):
        raise BenchmarkError(f"{file}: expected a JSON list of problems, got {type(data).__name__}.")
    for row, record in enumerate(data):
        yield f"{file}[row {row}]", record


def _read_dataset(
    path: str, split: str | None, subset: str | None, on_disk: bool
) -> Iterator[tuple[str, Any]]:
    import datasets

    if on_disk:
        data: Any = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            if split is None or split not in data:
                raise BenchmarkError(f"{path}: a saved DatasetDict with splits {list(data)}; set split.")
            data = data[split]
    else:
        try:
            data = datasets.load_dataset(path, subset, split=split)
        except Exception as exc:  # no network, no such dataset, ... in many types
            raise BenchmarkError(
                f"{path}: not a local file, and loading it from the hub failed: {exc}"
            ) from exc
    for row, record in enumerate(data):
        yield f"{path}[row {row}]", record


def _first(record: dict[str, Any], keys: Sequence[str]) -> tuple[str, Any] | None:
    for key in keys:
        if key in record and record[key] is not None:
            return key, record[key]
    return None


def _answer_text(value: Any) -> str:
    """A reference answer as text: integral floats without ``.0``; lists joined with ", "."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return ", ".join(strip_math_delimiters(_answer_text(v)).strip() for v in value)
    return strip_math_delimiters(str(value)).strip()


def parse_problem(fmt: str, benchmark: str, record: Any, location: str, row: int) -> Problem:
    """One record of benchmark format ``fmt`` as a :class:`Problem`.

    Raises:
        BenchmarkError: the record is not an object, lacks a field, or has no reference answer.
    """
    if fmt not in BENCHMARK_FORMATS:
        raise BenchmarkError(f"format {fmt!r}: must be one of {', '.join(BENCHMARK_FORMATS)}.")
    if not isinstance(record, dict):
        raise BenchmarkError(f"{location}: expected an object, got {type(record).__name__}.")
    found_q = _first(record, _QUESTION_KEYS[fmt])
    found_a = _first(record, _ANSWER_KEYS[fmt])
    missing = [
        keys for keys, found in ((_QUESTION_KEYS[fmt], found_q), (_ANSWER_KEYS[fmt], found_a)) if not found
    ]
    if found_q is None or found_a is None:
        wanted = " and ".join(" or ".join(repr(k) for k in keys) for keys in missing)
        raise BenchmarkError(
            f"{location}: a {fmt} record needs {wanted}; it has {sorted(record)}. "
            "Is the benchmark's format right?"
        )
    question = str(found_q[1])
    context = record.get("context") if fmt == "olympiadbench" else None
    if context:
        question = f"{context}\n\n{question}"
    raw = found_a[1]
    reference: str | None
    if fmt == "gsm8k":
        reference = extract_gsm8k(str(raw))
        reference = reference.replace(",", "") if reference is not None else None
    elif fmt == "math":
        reference = extract_boxed(str(raw))
    else:
        reference = _answer_text(raw)
    if not reference:
        where = {"gsm8k": "no '####' answer line", "math": "no \\boxed{} answer"}.get(fmt, "an empty answer")
        raise BenchmarkError(f"{location}: {where} in field {found_a[0]!r}.")
    found_id = _first(record, _ID_KEYS)
    meta = {k: record[k] for k in _META_KEYS if record.get(k) is not None}
    return Problem(
        benchmark=benchmark,
        id=str(found_id[1]) if found_id else str(row),
        question=question,
        reference=reference,
        location=location,
        meta=meta,
    )


def load_problems(
    fmt: str,
    path: str,
    benchmark: str | None = None,
    split: str | None = "test",
    subset: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Every problem of a benchmark (the first ``limit`` when set), in file order.

    Raises:
        BenchmarkError: see :func:`read_records` and :func:`parse_problem`; also duplicate ids and
            a benchmark without any problem.
    """
    name = benchmark or fmt
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for row, (location, record) in enumerate(read_records(path, split, subset)):
        if limit is not None and len(problems) >= limit:
            break
        problem = parse_problem(fmt, name, record, location, row)
        if problem.id in seen:
            raise BenchmarkError(
                f"{location}: id {problem.id!r} also at {seen[problem.id]}; ids must be unique within "
                "a benchmark."
            )
        seen[problem.id] = location
        problems.append(problem)
    if not problems:
        raise BenchmarkError(f"{path}: no problems found.")
    return problems


def render_prompt(template: str, problem: Problem) -> str:
    """The user message: ``template`` with ``{problem}`` replaced by the problem text.

    A plain replacement, not ``str.format``: the braces of ``\\boxed{}`` need no escaping.
    """
    return template.replace("{problem}", problem.question)


def path_exists(path: str) -> bool:
    """Whether ``path`` is an existing file/directory or a pattern matching one."""
    return bool(glob.glob(path)) if any(c in path for c in "*?[") else os.path.exists(path)
