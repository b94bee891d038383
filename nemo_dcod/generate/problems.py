"""Problems for ``generate``: JSONL, JSON, Parquet or saved Hugging Face datasets, through a field
mapping, validated before any model is loaded.

Every problem is read and checked up front (a typo in a field name fails in a second, not after
the first shard's hour of generation): a record that is not an object, a missing or null field,
a problem that is not text or is empty, an id seen twice. Errors name the record (``file:line``
for JSONL, ``path[row N]`` otherwise) and the field; up to :data:`MAX_REPORTED` are reported at
once.

A reference holding GSM8K's ``####`` or a ``\\boxed{}`` is reduced to that final answer with
eval's extraction (:func:`nemo_dcod.eval.answers.extract_answer`), so GSM8K's ``answer`` and
MATH's ``solution`` fields can be mapped directly; numbers become text (``142.0`` -> ``142``).
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_dcod.eval.answers import extract_answer, strip_math_delimiters
from nemo_dcod.generate.config import GenerateConfig, GenerateError, ProblemFieldsSection

__all__ = ["MAX_REPORTED", "TraceProblem", "expand_inputs", "load_problems", "parse_problem", "read_records"]

MAX_REPORTED = 10
"""Bad records listed in one error before reading stops."""


@dataclass(frozen=True)
class TraceProblem:
    """One problem to write traces for."""

    id: str
    """Unique within the run: the mapped id field, or the record's position in the inputs."""
    text: str
    """The problem text (what the prompt template's {problem} becomes)."""
    reference: str | None
    """The reference final answer; None when the mapping names none."""
    location: str
    """Where the record came from: ``file:line`` (JSONL) or ``path[row N]``."""


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")):
            return "hf_disk"
        raise GenerateError(
            f"inputs: {path} is a directory but not a saved Hugging Face dataset (no dataset_info.json)."
        )
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise GenerateError(f"inputs: {path}: unknown suffix {suffix!r}; set format=jsonl|json|parquet|hf_disk.")


def expand_inputs(patterns: list[str], fmt: str) -> list[tuple[str, str]]:
    """``[(path, format)]`` of the configured inputs: globs expanded (sorted), formats resolved.

    Raises:
        GenerateError: a path that does not exist, a glob that matches nothing, an unknown suffix.
    """
    out: list[tuple[str, str]] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            paths = sorted(glob.glob(pattern, recursive=True))
            if not paths:
                raise GenerateError(f"inputs: {pattern!r} matches no file.")
        elif not os.path.exists(pattern):
            raise GenerateError(f"inputs: {pattern}: no such file or directory.")
        else:
            paths = [pattern]
        out.extend((path, _format_of(path, fmt)) for path in paths)
    return out


def _read_jsonl(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            location = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise GenerateError(f"{location}: not UTF-8 (byte {exc.start} of the line).") from None
            try:
                yield location, json.loads(text)
            except json.JSONDecodeError as exc:
                raise GenerateError(
                    f"{location}: malformed JSON: {exc.msg} (column {exc.colno}); one object per line."
                ) from None


def _read_json(path: str) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise GenerateError(f"{path}: not UTF-8 (byte {exc.start}).") from None
    except json.JSONDecodeError as exc:
        raise GenerateError(
            f"{path}: malformed JSON: {exc.msg} (line {exc.lineno}); one object per line? name it .jsonl."
        ) from None
    if not isinstance(data, list):
        raise GenerateError(f"{path}: expected a JSON list of problems, got {type(data).__name__}.")
    for row, record in enumerate(data):
        yield f"{path}[row {row}]", record


def _read_parquet(path: str) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise GenerateError(f"{path}: not a readable Parquet file: {exc}") from None
    for row, record in enumerate(rows):
        yield f"{path}[row {row}]", record


def _read_hf_disk(path: str, split: str | None) -> Iterator[tuple[str, Any]]:
    from datasets import Dataset, load_from_disk

    try:
        data: Any = load_from_disk(path)
    except (OSError, ValueError) as exc:  # FileNotFoundError, a damaged arrow file, ...
        raise GenerateError(f"{path}: not a readable saved Hugging Face dataset: {exc}") from None
    if not isinstance(data, Dataset):
        if split is None or split not in data:
            raise GenerateError(
                f"{path}: a DatasetDict with splits {sorted(data)}; set hf_split to one of them."
            )
        data = data[split]
    elif split is not None:
        raise GenerateError(f"{path}: a single-split dataset; unset hf_split (it is {split!r}).")
    for row, record in enumerate(data):
        yield f"{path}[row {row}]", record


def read_records(path: str, fmt: str, split: str | None = None) -> Iterator[tuple[str, Any]]:
    """``(location, raw record)`` of every record of one input, in order.

    Raises:
        GenerateError: an unreadable file, a line that is not UTF-8 or not JSON (with file:line).
    """
    try:
        if fmt == "jsonl":
            yield from _read_jsonl(path)
        elif fmt == "json":
            yield from _read_json(path)
        elif fmt == "parquet":
            yield from _read_parquet(path)
        elif fmt == "hf_disk":
            yield from _read_hf_disk(path, split)
        else:
            raise GenerateError(f"format={fmt!r}: not one of jsonl, json, parquet, hf_disk.")
    except PermissionError as exc:
        raise GenerateError(f"{path}: cannot be read ({exc.strerror}).") from None
    except IsADirectoryError:
        raise GenerateError(f"{path}: a directory; set format=hf_disk for a saved dataset.") from None


def _get(record: dict[str, Any], path: str, location: str, what: str) -> Any:
    node: Any = record
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            keys = f"; it has {', '.join(sorted(map(str, node))[:12])}" if isinstance(node, dict) else ""
            raise GenerateError(
                f"{location}: no field {path!r} ({what}){keys}. Set {what} to the right field."
            )
    if node is None:
        raise GenerateError(f"{location}: field {path!r} ({what}) is null.")
    return node


def reference_answer(value: Any) -> str:
    """A reference as the final answer text (see the module docstring); may be empty."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return str(int(value))
    if isinstance(value, list | tuple):
        return ", ".join(reference_answer(v) for v in value)
    text = str(value)
    found = extract_answer(text, "auto")
    return strip_math_delimiters(found if found is not None else text).strip()


def parse_problem(raw: Any, fields: ProblemFieldsSection, location: str, index: int) -> TraceProblem:
    """One raw record as a :class:`TraceProblem`.

    Raises:
        GenerateError: not an object, a missing or null field, a problem that is not non-empty text.
    """
    if not isinstance(raw, dict):
        raise GenerateError(f"{location}: expected an object (a JSON dict), got {type(raw).__name__}.")
    text = _get(raw, fields.problem, location, "fields.problem")
    if not isinstance(text, str):
        raise GenerateError(
            f"{location}: field {fields.problem!r} (fields.problem) is a {type(text).__name__}, not text."
        )
    if not text.strip():
        raise GenerateError(f"{location}: field {fields.problem!r} (fields.problem) is empty.")
    reference = None
    if fields.reference is not None:
        reference = reference_answer(_get(raw, fields.reference, location, "fields.reference"))
        if not reference:
            raise GenerateError(f"{location}: field {fields.reference!r} (fields.reference) holds no answer.")
    pid = str(index)
    if fields.id is not None:
        value = _get(raw, fields.id, location, "fields.id")
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise GenerateError(
                f"{location}: field {fields.id!r} (fields.id) is a {type(value).__name__}; ids are "
                "strings or integers."
            )
        pid = str(value)
    return TraceProblem(pid, text, reference, location)


def load_problems(cfg: GenerateConfig) -> list[TraceProblem]:
    """Every problem of ``cfg.inputs`` (the first ``cfg.limit``), in input order.

    Raises:
        GenerateError: any bad record (up to :data:`MAX_REPORTED` listed together), duplicate ids,
            or no problem at all.
    """
    problems: list[TraceProblem] = []
    errors: list[str] = []
    seen: dict[str, str] = {}
    index = 0
    for path, fmt in expand_inputs(cfg.inputs, cfg.format):
        for location, raw in read_records(path, fmt, cfg.hf_split):
            if cfg.limit is not None and index >= cfg.limit:
                break
            try:
                problem = parse_problem(raw, cfg.fields, location, index)
            except GenerateError as exc:
                errors.append(str(exc))
            else:
                if problem.id in seen:
                    errors.append(
                        f"{location}: id {problem.id!r} (fields.id) is also the id at {seen[problem.id]}; "
                        "ids must be unique (or set fields.id=null to number the problems)."
                    )
                seen[problem.id] = location
                problems.append(problem)
            index += 1
            if len(errors) >= MAX_REPORTED:
                break
        if len(errors) >= MAX_REPORTED:
            break
    if errors:
        more = " (stopped there; fix these first)" if len(errors) >= MAX_REPORTED else ""
        raise GenerateError(
            f"{len(errors)} bad problem record(s){more}:\n" + "\n".join(f"  - {e}" for e in errors)
        )
    if not problems:
        raise GenerateError(f"inputs: {', '.join(cfg.inputs)}: no problems found (empty files?).")
    return problems
