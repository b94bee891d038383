"""Bad input to ``prepare`` and to the packed store, each a clear error or a counted skip, never a
silent success (issue 13):

1. inputs that yield no document (empty, blank, another format under a .jsonl name, everything
   skipped or filtered) leave no store that reads as complete, and the CLI exits 1 naming the inputs
   and the skip counts; a store of zero rows is refused by the training and the score readers;
2. whatever a hostile record makes the parser raise is that record's counted skip (a fuzz of a few
   hundred generated lines: every bad line counted, every good line kept);
3. a UTF-8 byte-order mark and CRLF line ends are not bad records;
4. a NaN, ±inf or positive teacher log-prob written into a shard is an error naming the shard's
   column file, the row and the position when the row is read;
5. no space left on the device and no permission on the output folder: a clear error and nothing
   that reads as complete (real tmpfs mounts where this process may mount, else injected errors).
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.trace_fixtures import make_tokenizer, record, write_jsonl

from nemo_dcod.cli import main as cli_main
from nemo_dcod.config import to_yaml
from nemo_dcod.data.config import FieldsSection, PrepareConfig
from nemo_dcod.data.prepare import run_prepare
from nemo_dcod.data.readers import BAD_RECORD_REASONS, DataError
from nemo_dcod.data.store import (
    BadTeacherValueError,
    IncompleteStoreError,
    PackedStore,
    StoreWriteError,
    first_bad_logprob,
)
from nemo_dcod.score.plan import ROW_INPUTS

TEACHER = {"teacher_tokens": "ids", "teacher_logprobs": "lps"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def config(inputs: list[Path], tokenizer: str, out: Path, **kw: Any) -> PrepareConfig:
    fields = FieldsSection(**kw.pop("fields", {}))
    return PrepareConfig(
        inputs=[str(p) for p in inputs],
        tokenizer=tokenizer,
        out_dir=str(out),
        fields=fields,
        **{"seq_length": 64, "records_per_shard": 16, **kw},
    )


def assert_not_a_store(out: Path) -> None:
    assert not (out / "manifest.json").exists()
    with pytest.raises(IncompleteStoreError):
        PackedStore(out)
    with pytest.raises(IncompleteStoreError):
        PackedStore(out, columns=ROW_INPUTS, scoring=True)  # as `score` opens it


def kept_lines(out: Path) -> list[int]:
    """The input line (0-based) of every document in the store, sorted."""
    docs = [np.load(p) for p in sorted((out / "shards").glob("shard_*/documents.npy"))]
    return sorted(int(i) for d in docs for i in d[:, 3])


# --- 1. nothing usable ----------------------------------------------------------------------------


def _parquet_bytes(tmp_path: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["w1"], "response": ["w2"]}), tmp_path / "real.parquet")
    return (tmp_path / "real.parquet").read_bytes()


# id -> (file content, config overrides, what the error says besides the path)
NOTHING_USABLE: dict[str, tuple[Any, dict[str, Any], list[str]]] = {
    "empty": (b"", {}, ["0 documents kept of 0 records read", "(0 records, 0 kept)", "hold no record"]),
    "blank_lines": (b"\n  \n\r\n", {}, ["0 documents kept of 0 records read", "skipped: none"]),
    "bom_only": (b"\xef\xbb\xbf", {}, ["0 documents kept of 0 records read"]),
    "csv_named_jsonl": (
        b"prompt,response\nw1,w2\nw3,w4\n",
        {},
        ["0 documents kept of 3 records read", "skipped: malformed_json 3", "(3 records, 0 kept)"],
    ),
    "all_bad": (
        b'{"prompt": "w1"}\n[1]\n{"prompt": "w1", "response": 7}\n',
        {},
        ["skipped: missing_field 1, not_an_object 1, wrong_type 1", "check the inputs' format"],
    ),
    "all_filtered": (
        b'{"prompt": "w1", "response": "w2 \\\\boxed{3}", "ref": "4"}\n'
        b'{"prompt": "w1", "response": "w2", "ref": "4"}\n',
        {"answer_filter": "boxed", "fields": {"reference": "ref"}},
        ["skipped: no_answer 1, wrong_answer 1", "answer_filter"],
    ),
    "all_too_long": (
        json.dumps({"prompt": "w1", "response": " ".join(["w2"] * 80)}).encode() + b"\n",
        {"overlong": "drop"},
        ["skipped: too_long 1"],
    ),
}


@pytest.mark.parametrize("case", list(NOTHING_USABLE))
def test_inputs_that_yield_no_document_leave_no_store(
    tmp_path: Path, tokenizer: str, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    content, overrides, says = NOTHING_USABLE[case]
    path = tmp_path / "traces.jsonl"
    path.write_bytes(content)
    cfg = config([path], tokenizer, tmp_path / "store", **overrides)
    with pytest.raises(DataError) as err:
        run_prepare(cfg, quiet=True)
    message = str(err.value)
    assert message.startswith("nothing usable: ") and f"{path} (" in message, message
    for needle in says:
        assert needle in message, (needle, message)
    assert "is not a store (no manifest.json" in message
    assert_not_a_store(tmp_path / "store")
    # Re-running does not turn it into a store either; the CLI exits 1 with the same message.
    (tmp_path / "cfg.yaml").write_text(to_yaml(cfg))
    capsys.readouterr()
    assert cli_main(["prepare", "--config", str(tmp_path / "cfg.yaml")]) == 1
    err_out = capsys.readouterr().err
    assert err_out.startswith("nemo-dcod prepare: nothing usable") and says[0] in err_out
    assert_not_a_store(tmp_path / "store")


@pytest.mark.parametrize(
    "magic, what",
    [
        ("parquet", "a Parquet file"),
        (b"\x1f\x8b\x08\x00", "gzip-compressed"),
        (b"PK\x03\x04", "a zip archive"),
        (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
        ("utf16", "UTF-16/32 (little-endian) text"),
        ("utf32be", "UTF-32 (big-endian) text"),
    ],
)
def test_another_format_under_a_jsonl_name_is_named(
    tmp_path: Path, tokenizer: str, magic: Any, what: str
) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [record(i) for i in range(3)])
    path = tmp_path / "traces.jsonl"
    if magic == "parquet":
        path.write_bytes(_parquet_bytes(tmp_path))
    elif magic == "utf16":
        path.write_bytes(json.dumps(record(0)).encode("utf-16"))
    elif magic == "utf32be":
        path.write_bytes(b"\x00\x00\xfe\xff" + json.dumps(record(0)).encode("utf-32-be"))
    else:
        path.write_bytes(magic + b"rest")
    # Even beside a good file: a whole file of another format is never a pile of skipped lines.
    with pytest.raises(DataError, match=f"{re.escape(str(path))}: {re.escape(what)} .*not JSON Lines: "):
        run_prepare(config([good, path], tokenizer, tmp_path / "store"), quiet=True)
    assert_not_a_store(tmp_path / "store")


def test_nothing_usable_is_counted_over_all_inputs(tmp_path: Path, tokenizer: str) -> None:
    """0 documents kept *in total* is the error: an empty file beside a good one is fine, and a
    shard whose records were all skipped still has every column (teacher log-probs included)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{broken"] * 16)  # one whole shard of bad lines
    good = write_jsonl(tmp_path / "good.jsonl", [record(i, teacher=True) for i in range(5)])
    cfg = config([empty, bad, good], tokenizer, tmp_path / "store", fields=TEACHER)
    report = run_prepare(cfg, quiet=True)
    assert report["records_kept"] == 5 and report["skipped"] == {"malformed_json": 16}
    store = PackedStore(tmp_path / "store")
    assert len(store) >= 1 and "teacher_logprobs" in store[0]
    (tmp_path / "store" / "manifest.json").unlink()
    assert run_prepare(cfg, quiet=True)["shards_reused"] == 2  # the empty shard is whole, reused


def test_a_store_of_zero_rows_is_refused_by_training_and_score(tmp_path: Path, tokenizer: str) -> None:
    """A manifest listing no rows (as prepare wrote before this check, or by hand) and a manifest
    that is not JSON: the training reader and score's reader both refuse them."""
    good = write_jsonl(tmp_path / "t.jsonl", [record(i) for i in range(3)])
    run_prepare(config([good], tokenizer, tmp_path / "s"), quiet=True)
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "shards": []}))
    for kw in ({}, {"columns": ROW_INPUTS, "scoring": True}):
        with pytest.raises(IncompleteStoreError, match="the store holds no rows"):
            PackedStore(tmp_path / "s", **kw)  # type: ignore[arg-type]
    manifest_path.write_bytes(b"\x00garbage")
    with pytest.raises(IncompleteStoreError, match=r"manifest\.json: not a manifest"):
        PackedStore(tmp_path / "s")
    # prepare rebuilds the damaged store (same inputs) rather than tripping over it.
    assert run_prepare(config([good], tokenizer, tmp_path / "s"), quiet=True)["records_kept"] == 3
    assert len(PackedStore(tmp_path / "s")) >= 1


# --- 2. hostile records: each a counted skip --------------------------------------------------------

DEEP_LIST = b'{"prompt": "w1", "response": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HUGE_INT = b"9" * 5000  # more digits than Python's int parser converts: ValueError, not JSONDecodeError
BIG_INT = b"9" * 400  # parses, but overflows a float


def _good(i: int) -> dict[str, Any]:
    return record(i, words=2 + i % 9, teacher=True)


def _dumps(rec: dict[str, Any], field: str, value: bytes) -> bytes:
    """``rec`` as JSON with ``field`` replaced by the raw JSON text ``value`` (NaN, 1e400, ...)."""
    marker = "@@HOSTILE@@"
    return json.dumps({**rec, field: marker}).encode().replace(f'"{marker}"'.encode(), value)


def _list_with(values: list[Any], at: int, value: bytes) -> bytes:
    items = [json.dumps(v).encode() for v in values]
    items[at % len(items)] = value
    return b"[" + b", ".join(items) + b"]"


# Raw JSON texts that no field of a record may hold: (field -> values). Each makes the record bad.
NOT_A_STRING = [
    b"7",
    b"1.5",
    b"null",
    b"true",
    b"NaN",
    b"-Infinity",
    b"1e400",
    b"[1, 2]",
    b'{"a": 1}',
    BIG_INT,
]
NOT_A_LOGPROB = [
    b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"-1e39", b"0.5", b'"x"', b"null",
    b"true", b"[-1.0]", b"{}", BIG_INT, b"-" + BIG_INT,
]  # fmt: skip
NOT_A_TOKEN_ID = [b"-1", b"2147483648", b"1.5", b"null", b"true", b'"w2"', b"[1]", BIG_INT]
WHOLE_LINES = [
    DEEP_LIST,
    b"[" * 50_000,
    b'{"a":' * 30_000 + b"1" + b"}" * 30_000,
    b'{"prompt": "w1", "response": "w2", "id": ' + HUGE_INT + b"}",
    b"NaN", b"Infinity", b"-1e400", b"null", b"true", b'"a string"', b"[]", b"{}", b"0", HUGE_INT,
    b'{"prompt": "w1", "response": "w2 \xff\xfe w3"}',
    b'{"prompt": "w1", "response": "w2 \\ud800"}',
    b'{"prompt": "w1\x00", "response": "w2"}',
    b"{'prompt': 'w1', 'response': 'w2'}",
    b"prompt,response",
    b"PAR1\x15\x04\x15",
]  # fmt: skip


def hostile_lines(seed: int = 0) -> Iterator[bytes]:
    """A few hundred lines, each a record prepare must skip: broken lines, every field replaced by
    values it may not hold, log-prob and token-id lists with one hostile element, good lines cut
    short, and random bytes."""
    rng = random.Random(seed)
    yield from WHOLE_LINES
    for value in NOT_A_STRING:
        for field in ("prompt", "response"):
            yield _dumps(_good(rng.randrange(64)), field, value)
    for value in [*NOT_A_LOGPROB, b'"x"', b"[]", b"{}"]:
        yield _dumps(_good(rng.randrange(64)), "lps", value)  # not a list / empty list
    for value in NOT_A_LOGPROB:
        for _ in range(3):
            rec = _good(rng.randrange(64))
            yield _dumps(rec, "lps", _list_with(rec["lps"], rng.randrange(99), value))
    for value in NOT_A_TOKEN_ID:
        for _ in range(3):
            rec = _good(rng.randrange(64))
            yield _dumps(rec, "ids", _list_with(rec["ids"], rng.randrange(99), value))
    for _ in range(10):  # a valid id, but not the token the text has: the engine disagrees
        rec = _good(rng.randrange(64))
        yield _dumps(rec, "ids", _list_with(rec["ids"], 0, b"150"))
    for _ in range(10):  # one log-prob too many or too few
        rec = _good(rng.randrange(64))
        lps = rec["lps"] + [-1.0] if rng.random() < 0.5 else rec["lps"][:-1]
        yield json.dumps({**rec, "lps": lps}).encode()
    for _ in range(100):  # a good record cut short: no proper prefix of an object is JSON
        line = json.dumps(_good(rng.randrange(64))).encode()
        yield line[: rng.randrange(1, len(line) - 1)]
    for _ in range(60):
        yield b"~" + bytes(
            rng.choice([b for b in range(256) if b != 10]) for _ in range(rng.randrange(1, 80))
        )


def good_lines(n: int) -> Iterator[bytes]:
    """Good records, some in forms that must stay good: CRLF, a BOM (a joined file's), unused
    fields holding deep nesting, NaN or a huge number."""
    for i in range(n):
        line = json.dumps(_good(i)).encode()
        if i % 5 == 1:
            line += b"\r"
        elif i % 5 == 2:
            line = b"\xef\xbb\xbf" + line
        elif i % 5 == 3:
            line = (
                line[:-1]
                + b', "meta": '
                + b"[" * 200
                + b"]" * 200
                + b', "score": NaN, "n": '
                + BIG_INT
                + b"}"
            )
        yield line


def test_fuzzed_hostile_lines_are_each_a_counted_skip(tmp_path: Path, tokenizer: str) -> None:
    rng = random.Random(1)
    bad = list(hostile_lines())
    good = list(good_lines(120))
    lines = [(line, False) for line in bad] + [(line, True) for line in good]
    rng.shuffle(lines)
    lines.insert(0, (json.dumps(_good(99)).encode(), True))  # the file starts as JSON Lines
    path = tmp_path / "traces.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in lines) + b"\n")
    cfg = config([path], tokenizer, tmp_path / "store", fields=TEACHER, records_per_shard=64)
    report = run_prepare(cfg, quiet=True)
    assert len(bad) >= 300, len(bad)
    assert report["records_read"] == len(lines)
    assert report["records_kept"] == len(good) + 1, report["skipped"]
    assert sum(report["skipped"].values()) == len(bad), report["skipped"]
    assert set(report["skipped"]) <= set(BAD_RECORD_REASONS), report["skipped"]
    assert kept_lines(tmp_path / "store") == [k for k, (_, ok) in enumerate(lines) if ok]
    assert report["skip_examples"].keys() == report["skipped"].keys(), report["skip_examples"]
    for reason, examples in report["skip_examples"].items():
        assert examples and all(e.startswith(f"{path}:") for e in examples), (reason, examples)
    store = PackedStore(tmp_path / "store")
    for k in range(len(store)):  # what was kept reads back: finite, <= 0 teacher log-probs
        row = store[k]
        assert bool((row["teacher_logprobs"][row["loss_mask"] > 0] <= 0).all())


# Lines whose parse raised something other than RecordError before: each counted, and named.
PARSER_RAISES = {
    "deep_nesting": (DEEP_LIST, "malformed_json", "nested too deeply for the JSON parser"),
    "huge_integer": (
        b'{"prompt": "w1", "response": "w2", "id": ' + HUGE_INT + b"}",
        "malformed_json",
        "Exceeds the limit (4300 digits)",
    ),
    "integer_logprob_beyond_float": (
        _dumps(_good(3), "lps", _list_with(_good(3)["lps"], 0, b"-" + BIG_INT)),
        "nonfinite_logprobs",
        "bits is no float",
    ),
    "logprob_beyond_float32": (
        _dumps(_good(3), "lps", _list_with(_good(3)["lps"], 1, b"-1e39")),
        "nonfinite_logprobs",
        "lps[1] = -1e+39 is -inf in float32",
    ),
    "token_id_beyond_int32": (
        _dumps(_good(3), "ids", _list_with(_good(3)["ids"], 1, BIG_INT)),
        "wrong_type",
        "teacher token ids must be in [0, 2147483647]",
    ),
}


@pytest.mark.parametrize("case", list(PARSER_RAISES))
def test_what_the_parser_raises_is_the_records_skip_or_error(
    tmp_path: Path, tokenizer: str, case: str
) -> None:
    line, reason, detail = PARSER_RAISES[case]
    path = tmp_path / "traces.jsonl"
    path.write_bytes(json.dumps(_good(1)).encode() + b"\n" + line + b"\n" + json.dumps(_good(2)).encode())
    report = run_prepare(config([path], tokenizer, tmp_path / "skip", fields=TEACHER), quiet=True)
    assert report["records_kept"] == 2 and report["skipped"] == {reason: 1}, report["skipped"]
    (example,) = report["skip_examples"][reason]
    assert example.startswith(f"{path}:2: ") and detail in example, example
    cfg = config([path], tokenizer, tmp_path / "error", fields=TEACHER, on_bad_record="error")
    with pytest.raises(DataError, match=f"{path}:2: {reason}: ") as err:
        run_prepare(cfg, quiet=True)
    assert detail in str(err.value) and "set on_bad_record=skip" in str(err.value)
    assert_not_a_store(tmp_path / "error")


def test_an_unforeseen_exception_is_the_records_skip(
    tmp_path: Path, tokenizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net under every check: an exception no check foresaw, raised while one record
    is parsed or tokenized, is that record's ``unparseable_record`` (named), not the run's end.
    Injected (every known hostile input has its own reason above): the 2nd record's parse raises
    RecursionError, the 3rd record's answer check a KeyError."""
    import nemo_dcod.data.prepare as prepare_module
    from nemo_dcod.data.tokenize import TraceTokenizer

    real_parse, real_answer = prepare_module.parse_record, TraceTokenizer._answer_problem

    def parse(raw: Any, fields: Any, location: str, *a: Any) -> Any:
        if location.endswith(":2"):
            raise RecursionError("maximum recursion depth exceeded")
        return real_parse(raw, fields, location, *a)

    def answer(self: TraceTokenizer, trace: Any) -> Any:
        if trace.location.endswith(":3"):
            raise KeyError("boom")
        return real_answer(self, trace)

    monkeypatch.setattr(prepare_module, "parse_record", parse)
    monkeypatch.setattr(TraceTokenizer, "_answer_problem", answer)
    path = write_jsonl(tmp_path / "t.jsonl", [record(i) for i in range(4)])
    report = run_prepare(config([path], tokenizer, tmp_path / "s"), quiet=True)
    assert report["records_kept"] == 2 and report["skipped"] == {"unparseable_record": 2}
    assert report["skip_examples"]["unparseable_record"] == [
        f"{path}:2: RecursionError: maximum recursion depth exceeded",
        f"{path}:3: KeyError: 'boom'",
    ]


# --- 3. file-level markers ---------------------------------------------------------------------------


def test_byte_order_mark_and_crlf_are_not_bad_records(tmp_path: Path, tokenizer: str) -> None:
    records = [record(i, teacher=True) for i in range(4)]
    plain = write_jsonl(tmp_path / "plain.jsonl", records)
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes().replace(b"\n", b"\r\n"))
    one = run_prepare(config([plain], tokenizer, tmp_path / "a", fields=TEACHER), quiet=True)
    two = run_prepare(config([windows], tokenizer, tmp_path / "b", fields=TEACHER), quiet=True)
    assert two["skipped"] == {} and two["records_kept"] == 4
    a, b = PackedStore(tmp_path / "a"), PackedStore(tmp_path / "b")
    assert len(a) == len(b) and one["tokens"] == two["tokens"]
    for k in range(len(a)):  # the same tokens, masks and teacher log-probs: no "\r", no U+FEFF
        assert all(bool((a[k][n] == b[k][n]).all()) for n in a[k])
    # A non-UTF-8 byte after a BOM is still named at its offset in the line as written.
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'\xef\xbb\xbf{"prompt": "\xff"}\n' + json.dumps(records[0]).encode())
    report = run_prepare(config([bad], tokenizer, tmp_path / "c"), quiet=True)
    assert report["skip_examples"]["not_utf8"] == [f"{bad}:1: byte offset 15 in the line is not UTF-8"]


# --- 4. bad values already in a shard ----------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_store(tmp_path_factory: pytest.TempPathFactory, tokenizer: str) -> Path:
    root = tmp_path_factory.mktemp("teacher_store")
    traces = write_jsonl(root / "t.jsonl", [record(i, words=3 + i % 7, teacher=True) for i in range(40)])
    run_prepare(config([traces], tokenizer, root / "store", fields=TEACHER, records_per_shard=20), quiet=True)
    return root / "store"


def _copy(store: Path, to: Path) -> Path:
    subprocess.run(["cp", "-r", str(store), str(to)], check=True)
    return to


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 0.5])
def test_bad_teacher_value_in_a_shard_names_shard_row_and_position(
    teacher_store: Path, tmp_path: Path, value: float
) -> None:
    store_dir = _copy(teacher_store, tmp_path / "s")
    column = store_dir / "shards" / "shard_00001" / "teacher_logprobs.npy"
    lps = np.load(column)
    mask = np.load(store_dir / "shards" / "shard_00001" / "loss_mask.npy")
    position = int(np.flatnonzero(mask[1])[2])  # a trained position of the shard's row 1
    untrained = int(np.flatnonzero(mask[0] == 0)[0])
    lps[1, position] = value
    lps[0, untrained] = np.nan  # masked positions may hold anything: never an error
    np.save(column, lps)
    store = PackedStore(store_dir)  # opening checks shapes only: cheap, and the values are fine...
    first = int(store.offsets[1])
    store[first]  # ... in row 0, whose NaN is at an untrained position
    with pytest.raises(BadTeacherValueError) as err:
        store[first + 1]
    assert str(err.value).startswith(
        f"{column}: row 1 (store row {first + 1}), position {position}: {value!r} at a trained position"
    ), str(err.value)
    assert "re-run prepare" in str(err.value)
    assert isinstance(err.value, DataError)  # what the CLI stages report as an error
    # Score reads no teacher column (columns=ROW_INPUTS): it rewrites them, so they are not checked.
    PackedStore(store_dir, columns=ROW_INPUTS)[first + 1]


def test_first_bad_logprob_checks_trained_positions_of_every_column_shape() -> None:
    lp = -np.random.default_rng(0).random((2, 6, 3)).astype(np.float32)  # [R, S, K]
    trained = np.zeros((2, 6), dtype=bool)
    trained[1, 2:5] = True
    assert first_bad_logprob(lp, trained) is None
    lp[0, 3, 1] = np.nan  # untrained
    assert first_bad_logprob(lp, trained) is None
    at, value = first_bad_logprob(lp) or ((), 0.0)
    assert at == (0, 3, 1) and math.isnan(value)
    lp[1, 4, 2] = np.inf
    assert first_bad_logprob(lp, trained) == ((1, 4, 2), float("inf"))
    assert first_bad_logprob(lp[1, :, 0], trained[1]) is None
    row = lp[1, :, 0].copy()
    row[2] = 2e-4  # beyond the rounding tolerance the loss allows (1e-4)
    assert first_bad_logprob(row, trained[1]) == ((2,), pytest.approx(2e-4))
    row[2] = 5e-5
    assert first_bad_logprob(row, trained[1]) is None


# --- 5. no space, no permission ----------------------------------------------------------------------


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                    "the injected-error tests cover the same paths")  # fmt: skip


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for where in made:
        subprocess.run(["umount", str(where)], check=False)


@pytest.fixture(scope="module")
def big_traces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Traces whose store (~200 KiB) does not fit a 64 KiB file system."""
    root = tmp_path_factory.mktemp("big")
    return write_jsonl(root / "t.jsonl", [record(i, words=40 + i % 20) for i in range(160)])


def test_no_space_left_on_a_real_full_device(
    big_traces: Path, tokenizer: str, tmp_path: Path, mounts: list[Path]
) -> None:
    full = tmp_path / "full"
    _mount_tmpfs(full, "size=64k")
    mounts.append(full)
    cfg = config([big_traces], tokenizer, full / "store", seq_length=512, records_per_shard=40)
    with pytest.raises(StoreWriteError) as err:
        run_prepare(cfg, quiet=True)
    message = str(err.value)
    assert "cannot write (No space left on device, ENOSPC): no space left on the device" in message
    assert "/shards/shard_0000" in message or "report.json" in message, message
    assert_not_a_store(full / "store")
    assert not list((full / "store" / "shards").glob(".tmp-*"))  # the partial shard is removed


def test_no_space_left_injected_mid_shard_and_at_the_manifest(
    big_traces: Path, tokenizer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC raised by numpy's save in the middle of the 2nd shard, then by the rename that would
    put the manifest in place: each a StoreWriteError naming what was written, no manifest, no
    temp files; with space again, the run resumes (the finished shards kept)."""
    import nemo_dcod.data.store as store_module

    cfg = config([big_traces], tokenizer, tmp_path / "s", seq_length=512, records_per_shard=40)
    save, calls = np.save, [0]

    def full_save(path: Any, array: Any) -> None:
        calls[0] += 1
        if calls[0] == 6:  # 4 files per shard: the 2nd file of shard 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(path, array)

    monkeypatch.setattr(store_module.np, "save", full_save)
    with pytest.raises(
        StoreWriteError, match=r"shards/shard_00001: cannot write \(No space left on device, ENOSPC\)"
    ):
        run_prepare(cfg, quiet=True)
    assert_not_a_store(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir()) == ["shard_00000"]
    monkeypatch.setattr(store_module.np, "save", save)
    replace = os.replace

    def full_replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", full_replace)
    with pytest.raises(StoreWriteError, match=r"manifest\.json: cannot write \(No space left on device"):
        run_prepare(cfg, quiet=True)
    assert_not_a_store(tmp_path / "s")
    assert not [p.name for p in (tmp_path / "s").iterdir() if p.name.startswith(".")]  # no temp file
    monkeypatch.setattr(store_module.os, "replace", replace)
    report = run_prepare(cfg, quiet=True)
    assert report["shards_reused"] == 4 and len(PackedStore(tmp_path / "s")) == report["rows"]


def test_no_permission_on_the_output_folder(
    big_traces: Path, tokenizer: str, tmp_path: Path, mounts: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A read-only output folder: ``chmod 0o555`` where permissions apply (not root), a read-only
    tmpfs mount for root (which ignores permission bits)."""
    parent = tmp_path / "ro"
    if os.geteuid() == 0:
        _mount_tmpfs(parent, "ro,size=64k")
        mounts.append(parent)
        expected = "(Read-only file system, EROFS): a read-only file system"
    else:
        parent.mkdir()
        parent.chmod(0o555)
        expected = "(Permission denied, EACCES): no permission to write there"
    try:
        cfg = config([big_traces], tokenizer, parent / "store")
        with pytest.raises(
            StoreWriteError, match=f"{re.escape(str(parent / 'store'))}.*: cannot write "
        ) as err:
            run_prepare(cfg, quiet=True)
        assert expected in str(err.value), str(err.value)
        assert not (parent / "store" / "manifest.json").exists()
        (tmp_path / "cfg.yaml").write_text(to_yaml(cfg))
        capsys.readouterr()
        assert cli_main(["prepare", "--config", str(tmp_path / "cfg.yaml")]) == 1
        assert expected in capsys.readouterr().err
    finally:
        if os.geteuid() != 0:
            parent.chmod(0o755)


def test_no_permission_injected_at_the_shard_rename(
    big_traces: Path, tokenizer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The permission case where no mount or chmod can make it (root without mount rights): the
    rename that puts shard 0 in place raises EACCES, as on a folder whose permissions changed
    during the run; a StoreWriteError naming the shard, its temp dir removed, no manifest."""
    import nemo_dcod.data.store as store_module

    rename = os.rename

    def denied(src: Any, dst: Any) -> None:
        if Path(dst).name == "shard_00000":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        rename(src, dst)

    monkeypatch.setattr(store_module.os, "rename", denied)
    cfg = config([big_traces], tokenizer, tmp_path / "s", seq_length=512, records_per_shard=40)
    with pytest.raises(
        StoreWriteError,
        match=r"shards/shard_00000: cannot write \(Permission denied, EACCES\): no permission",
    ):
        run_prepare(cfg, quiet=True)
    assert_not_a_store(tmp_path / "s")
    assert list((tmp_path / "s" / "shards").iterdir()) == []
