"""Trace readers: JSONL, Parquet and saved Hugging Face datasets -> validated :class:`Trace` objects.

Reading is split in two so that several processes can share the work deterministically:

* :func:`plan_shards` cuts every input into :class:`ShardSpec` ranges of ``records_per_shard``
  records (JSONL by byte offsets of line starts, found in one pass; Parquet and saved datasets by
  row). A shard's content depends only on its range, never on how many workers there are.
* :func:`read_shard` yields ``(location, raw record)`` for one range, and :func:`parse_record`
  turns a raw record into a :class:`Trace` through the configured field mapping.

Every problem with a record is a :class:`RecordError` carrying a stable *reason* (the key it is
counted under in the report: ``malformed_json``, ``not_utf8``, ``missing_field``, ...) and the
record's location (``file:line`` for JSONL, ``path[row N]`` otherwise). Whatever the parser raises
on a hostile line (``RecursionError`` on deep nesting, ``ValueError`` on an integer of thousands of
digits) is that line's ``malformed_json``; an exception no check foresaw is ``unparseable_record``
(counted by ``prepare``, see :func:`nemo_dcod.data.prepare.build_shard`). File-level markers are
not records: a UTF-8 byte-order mark at the start of a line (the file's, or that of a file
``cat`` joined on) is dropped, CRLF line ends are whitespace; a file under a JSONL name whose
first bytes say it is something else (Parquet, gzip, zip, zstd, UTF-16/32) is a
:class:`DataError` naming what it is.
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

from nemo_dcod.data.config import FieldsSection

__all__ = [
    "BAD_RECORD_REASONS",
    "CUT_OFF_REASONS",
    "DataError",
    "RecordError",
    "ShardSpec",
    "TeacherTokens",
    "Trace",
    "expand_inputs",
    "input_identity",
    "parse_record",
    "plan_shards",
    "read_shard",
]

BAD_RECORD_REASONS = (
    "malformed_json",
    "not_utf8",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "no_assistant_turn",
    "empty_response",
    "nonfinite_logprobs",
    "positive_logprobs",
    "logprob_length_mismatch",
    "teacher_tokens_mismatch",
    "template_error",
    "unparseable_record",
)
"""Reasons that mean the record itself is broken: ``on_bad_record=error`` stops on them. The others
(``too_long``, ``no_trainable_tokens``, the answer filter's) are policy and are always counted."""

CUT_OFF_REASONS = ("length", "max_tokens")
"""Finish reasons that mean a response was cut at the engine's token limit: ``length`` (vLLM,
OpenAI, SGLang, TGI, ``nemo-dcod generate``) and ``max_tokens`` (Anthropic's name)."""

# Stored log-probs are rounded by engines; anything above this is not a log-probability
# (the same tolerance as the loss's input check).
POSITIVE_LOGPROB_TOLERANCE = 1e-4
_FLOAT32_MAX = 3.4028234663852886e38  # the store holds log-probs as float32; beyond this is -inf
_INT32_MAX = 2**31 - 1  # the store holds token ids as int32
_BLOCK = 1 << 24
_UTF8_BOM = b"\xef\xbb\xbf"
# First bytes of files that are not JSON Lines -> (what the file is, how to fix it).
_NOT_JSONL = (
    (b"PAR1", "a Parquet file", "set format=parquet (or rename it to .parquet)"),
    (b"\x1f\x8b", "gzip-compressed", "decompress it first (gunzip)"),
    (b"PK\x03\x04", "a zip archive", "unpack it first"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it first (zstd -d)"),
    (b"\xff\xfe", "UTF-16/32 (little-endian) text", "re-encode it as UTF-8 (iconv -t UTF-8)"),
    (b"\xfe\xff", "UTF-16 (big-endian) text", "re-encode it as UTF-8 (iconv -t UTF-8)"),
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian) text", "re-encode it as UTF-8 (iconv -t UTF-8)"),
)


class DataError(ValueError):
    """A problem with the inputs that stops ``prepare``: the message names the file (and line)."""


class RecordError(ValueError):
    """One bad record: ``reason`` is its report key, ``detail`` says what is wrong."""

    def __init__(self, reason: str, detail: str, location: str = "") -> None:
        self.reason = reason
        self.detail = detail
        self.location = location
        super().__init__(f"{location}: {reason}: {detail}" if location else f"{reason}: {detail}")


@dataclass(frozen=True)
class TeacherTokens:
    """Per-token teacher log-probs of the generated response, as the engine wrote them.

    Attributes:
        tokens: token ids or token strings; None when the engine gave log-probs only.
        logprobs: one log-prob per token, finite and <= 0.
    """

    tokens: list[int] | list[str] | None
    logprobs: list[float]


@dataclass(frozen=True)
class Trace:
    """One conversation, validated.

    Attributes:
        location: where the record came from (``file:line`` or ``path[row N]``).
        index: the record's position in its input (0-based line or row).
        messages: ``[{role, content, ...}]``, at least one assistant turn.
        reference: the reference answer, if the mapping names one.
        teacher: the last assistant turn's per-token teacher log-probs, if the mapping names them.
        cut_off: the engine cut the (last) response at its token limit (its finish reason is one
            of :data:`CUT_OFF_REASONS`); False when it stopped or the mapping names no reason.
    """

    location: str
    index: int
    messages: list[dict[str, Any]]
    reference: str | None = None
    teacher: TeacherTokens | None = None
    cut_off: bool = False


@dataclass(frozen=True)
class ShardSpec:
    """One unit of work: records ``[start, stop)`` of one input.

    For JSONL, ``byte_start``/``byte_stop`` delimit the lines and ``start`` is the first line's
    0-based number; for Parquet and saved datasets they are unused (0).
    """

    index: int
    path: str
    format: str
    start: int
    stop: int
    byte_start: int = 0
    byte_stop: int = 0
    split: str | None = None


def expand_inputs(patterns: list[str], fmt: str) -> list[tuple[str, str]]:
    """``[(path, format)]`` of the configured inputs: globs expanded (sorted), formats resolved.

    Raises:
        DataError: a path that does not exist, a glob that matches nothing, an unknown suffix.
    """
    out: list[tuple[str, str]] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            paths = sorted(glob.glob(pattern, recursive=True))
            if not paths:
                raise DataError(f"inputs: {pattern!r} matches no file.")
        else:
            if not os.path.exists(pattern):
                raise DataError(f"inputs: {pattern}: no such file or directory.")
            paths = [pattern]
        for path in paths:
            out.append((path, _format_of(path, fmt)))
    return out


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")):
            return "hf_disk"
        raise DataError(f"inputs: {path} is a directory but not a saved dataset (no dataset_info.json).")
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise DataError(f"inputs: {path}: unknown suffix {suffix!r}; set format=jsonl|parquet|hf_disk.")


def input_identity(path: str) -> list[tuple[str, int, int]]:
    """``[(file, size, mtime_ns)]`` of an input (every file below a directory): what the resume key
    compares, as ``make`` does; content is not hashed (that would be a full extra read)."""
    files = [path] if os.path.isfile(path) else sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
    out = []
    for f in files:
        st = os.stat(f)
        out.append(
            (os.path.relpath(f, path) if f != path else os.path.abspath(f), st.st_size, st.st_mtime_ns)
        )
    return out


def _load_hf(path: str, split: str | None) -> Any:
    from datasets import Dataset, load_from_disk

    ds = load_from_disk(path)
    if isinstance(ds, Dataset):
        if split is not None:
            raise DataError(f"{path}: a single-split dataset; unset hf_split (it is {split!r}).")
        return ds
    if split is None or split not in ds:
        raise DataError(f"{path}: a DatasetDict with splits {sorted(ds)}; set hf_split to one of them.")
    return ds[split]


def plan_shards(inputs: list[tuple[str, str]], records_per_shard: int, split: str | None) -> list[ShardSpec]:
    """Cut every input into ranges of ``records_per_shard`` records, numbered across inputs."""
    specs: list[ShardSpec] = []
    for path, fmt in inputs:
        if fmt == "jsonl":
            _check_jsonl_magic(path)
            starts, lines = _line_starts(path, records_per_shard)
            size = os.path.getsize(path)
            for i, (line, offset) in enumerate(starts):
                end_line, end = starts[i + 1] if i + 1 < len(starts) else (lines, size)
                specs.append(ShardSpec(len(specs), path, fmt, line, end_line, offset, end))
            continue
        if fmt == "parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(path).metadata.num_rows
        elif fmt == "hf_disk":
            rows = len(_load_hf(path, split))
        else:
            raise DataError(f"format={fmt!r}: not one of jsonl, parquet, hf_disk.")
        for start in range(0, rows, records_per_shard):
            stop = min(start + records_per_shard, rows)
            specs.append(ShardSpec(len(specs), path, fmt, start, stop, split=split))
    return specs


def _check_jsonl_magic(path: str) -> None:
    """Refuse a file under a JSONL name (or format=jsonl) that is another format by its first bytes.

    Raises:
        DataError: naming what the file is and how to fix it.
    """
    with open(path, "rb") as f:
        head = f.read(4)
    for magic, what, fix in _NOT_JSONL:
        if head.startswith(magic):
            raise DataError(f"{path}: {what} (its first bytes are {head!r}), not JSON Lines: {fix}.")


def _line_starts(path: str, every: int) -> tuple[list[tuple[int, int]], int]:
    """``[(line number, byte offset)]`` of lines 0, every, 2*every, ..., and the number of lines."""
    out: list[tuple[int, int]] = []
    offset, count = 0, 0
    with open(path, "rb", buffering=_BLOCK) as f:
        for number, line in enumerate(f):
            if number % every == 0:
                out.append((number, offset))
            offset += len(line)
            count = number + 1
    return out, count


def read_shard(spec: ShardSpec) -> Iterator[tuple[str, int, Any]]:
    """``(location, index, raw)`` of every record in ``spec``; raw is a dict or a :class:`RecordError`
    (a line that is not UTF-8 or not JSON); blank JSONL lines are not records and are passed over."""
    if spec.format == "jsonl":
        yield from _read_jsonl(spec)
    elif spec.format == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(spec.path)
        first = 0
        for group in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            lo, hi = max(spec.start, first), min(spec.stop, first + n)
            if lo < hi:
                rows = pf.read_row_group(group).slice(lo - first, hi - lo).to_pylist()
                for k, row in enumerate(rows):
                    yield f"{spec.path}[row {lo + k}]", lo + k, row
            first += n
    else:
        ds = _load_hf(spec.path, spec.split)
        for k, row in enumerate(ds.select(range(spec.start, spec.stop))):
            yield f"{spec.path}[row {spec.start + k}]", spec.start + k, row


def _read_jsonl(spec: ShardSpec) -> Iterator[tuple[str, int, Any]]:
    with open(spec.path, "rb") as f:
        f.seek(spec.byte_start)
        data = f.read(spec.byte_stop - spec.byte_start)
    for k, raw in enumerate(data.split(b"\n")):
        number = spec.start + k
        # A byte-order mark is a file-level marker (editors write it; `cat` of such files puts it
        # at a line start); U+FEFF never starts a JSON text, so dropping it changes no record.
        bom = len(_UTF8_BOM) if raw.startswith(_UTF8_BOM) else 0
        raw = raw[bom:]
        if number >= spec.stop or not raw.strip():
            continue
        location = f"{spec.path}:{number + 1}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            detail = f"byte offset {exc.start + bom} in the line is not UTF-8"
            yield location, number, RecordError("not_utf8", detail, location)
            continue
        yield location, number, _loads(text, location)


def _loads(text: str, location: str) -> Any:
    """The JSON value of one line, or the :class:`RecordError` of whatever the parser raised."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return RecordError("malformed_json", f"{exc.msg} (column {exc.colno})", location)
    except RecursionError:
        return RecordError("malformed_json", "nested too deeply for the JSON parser", location)
    except ValueError as exc:  # e.g. an integer of more digits than Python converts (4300)
        return RecordError("malformed_json", _short(str(exc)), location)


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _get(record: Any, path: str, location: str) -> Any:
    node = record
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            keys = f" (keys: {', '.join(sorted(map(str, node))[:12])})" if isinstance(node, dict) else ""
            raise RecordError("missing_field", f"no field {path!r}{keys}", location)
    if node is None:
        raise RecordError("missing_field", f"field {path!r} is null", location)
    return node


def _text(value: Any, name: str, location: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError("not_utf8", f"{name}: byte {exc.start} is not UTF-8", location) from None
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        value = "".join(p["text"] for p in value)  # OpenAI-style content parts
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"{name}: expected a string, got {type(value).__name__}", location)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. JSON "\ud800"
        raise RecordError(
            "not_utf8", f"{name}: character {exc.start} is not valid Unicode", location
        ) from None
    return value


def parse_record(
    raw: Any, fields: FieldsSection, location: str, index: int = 0, system_prompt: str | None = None
) -> Trace:
    """Validate one raw record and map it to a :class:`Trace`.

    Raises:
        RecordError: with the reason it is counted under (see :data:`BAD_RECORD_REASONS`).
    """
    if isinstance(raw, RecordError):
        raise raw
    if not isinstance(raw, dict):
        raise RecordError("not_an_object", f"expected a JSON object, got {type(raw).__name__}", location)
    messages: list[dict[str, Any]] = []
    if fields.layout == "prompt_response":
        if fields.system is not None:
            messages.append(
                {"role": "system", "content": _text(_get(raw, fields.system, location), "system", location)}
            )
        messages.append(
            {"role": "user", "content": _text(_get(raw, fields.prompt, location), fields.prompt, location)}
        )
        response = _text(_get(raw, fields.response, location), fields.response, location)
        messages.append({"role": "assistant", "content": response})
    else:
        turns = _get(raw, fields.messages, location)
        if not isinstance(turns, list):
            raise RecordError("wrong_type", f"{fields.messages}: expected a list of turns", location)
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RecordError("wrong_type", f"{fields.messages}[{i}]: expected an object", location)
            role = _text(
                _get(turn, fields.role_key, location), f"{fields.messages}[{i}].{fields.role_key}", location
            )
            content = _text(
                _get(turn, fields.content_key, location),
                f"{fields.messages}[{i}].{fields.content_key}",
                location,
            )
            extra = {k: v for k, v in turn.items() if k not in (fields.role_key, fields.content_key)}
            messages.append({**extra, "role": role, "content": content})
    if system_prompt is not None and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise RecordError("no_assistant_turn", "no turn with role 'assistant'", location)
    if not assistant[-1]["content"].strip():
        raise RecordError("empty_response", "the (last) assistant turn is empty", location)
    reference = None
    if fields.reference is not None:
        value = _get(raw, fields.reference, location)
        reference = _text(str(value) if isinstance(value, int | float) else value, fields.reference, location)
    teacher = _teacher(raw, fields, location) if fields.has_teacher() else None
    cut_off = False
    if fields.finish_reason is not None:
        reason = _text(_get(raw, fields.finish_reason, location), fields.finish_reason, location)
        cut_off = reason in CUT_OFF_REASONS
    return Trace(location, index, messages, reference, teacher, cut_off)


def _teacher(raw: Any, fields: FieldsSection, location: str) -> TeacherTokens:
    tokens: list[Any] | None
    if fields.teacher_entries is not None:
        entries = _get(raw, fields.teacher_entries, location)
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise RecordError("wrong_type", f"{fields.teacher_entries}: expected a list of objects", location)
        tokens = [_get(e, fields.teacher_token_key, location) for e in entries]
        logprobs = [_get(e, fields.teacher_logprob_key, location) for e in entries]
        name = fields.teacher_entries
    else:
        assert fields.teacher_logprobs is not None  # has_teacher()
        name = fields.teacher_logprobs
        logprobs = _get(raw, name, location)
        tokens = None if fields.teacher_tokens is None else _get(raw, fields.teacher_tokens, location)
        if not isinstance(logprobs, list):
            raise RecordError("wrong_type", f"{name}: expected a list of log-probs", location)
        if tokens is not None and not isinstance(tokens, list):
            raise RecordError("wrong_type", f"{fields.teacher_tokens}: expected a list of tokens", location)
    if tokens is not None:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            if any(not 0 <= t <= _INT32_MAX for t in tokens):
                raise RecordError("wrong_type", f"teacher token ids must be in [0, {_INT32_MAX}]", location)
        elif all(isinstance(t, str) for t in tokens):
            pass
        else:
            raise RecordError(
                "wrong_type", "teacher tokens: expected all ids (ints) or all strings", location
            )
        if len(tokens) != len(logprobs):
            raise RecordError(
                "logprob_length_mismatch",
                f"{len(tokens)} teacher tokens but {len(logprobs)} log-probs",
                location,
            )
    values: list[float] = []
    for i, lp in enumerate(logprobs):
        if isinstance(lp, bool) or not isinstance(lp, int | float):
            raise RecordError(
                "wrong_type", f"{name}[{i}]: expected a number, got {type(lp).__name__}", location
            )
        try:
            value = float(lp)
        except OverflowError:  # an integer of hundreds of digits
            raise RecordError(
                "nonfinite_logprobs",
                f"{name}[{i}]: an integer of {int(lp).bit_length()} bits is no float",
                location,
            ) from None
        if not math.isfinite(value):
            raise RecordError("nonfinite_logprobs", f"{name}[{i}] = {lp!r}", location)
        if value < -_FLOAT32_MAX:  # finite here, -inf in the store's float32
            raise RecordError("nonfinite_logprobs", f"{name}[{i}] = {lp!r} is -inf in float32", location)
        if value > POSITIVE_LOGPROB_TOLERANCE:
            raise RecordError(
                "positive_logprobs", f"{name}[{i}] = {lp!r} > 0 is not a log-probability", location
            )
        values.append(min(value, 0.0))
    if not values:
        raise RecordError(
            "logprob_length_mismatch", f"{name}: no log-probs for a non-empty response", location
        )
    return TeacherTokens(tokens, values)
