"""prepare, the input side: formats, field mappings, teacher log-probs, the answer filter, and the
bad-input suite (each case a test: a clear error naming file and line, or a counted skip)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.trace_fixtures import ids, make_bpe_tokenizer, make_tokenizer, record, write_jsonl

from nemo_dcod.data.answers import answers_match, extract_answer, extract_boxed, normalize_answer
from nemo_dcod.data.config import FieldsSection, PrepareConfig
from nemo_dcod.data.prepare import run_prepare
from nemo_dcod.data.readers import DataError
from nemo_dcod.data.store import PackedStore


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def prepare(
    tmp_path: Path, tokenizer: str, records: list[Any], fields: dict[str, Any] | None = None, **kw: Any
) -> tuple[dict[str, Any], PackedStore]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_jsonl(tmp_path / "traces.jsonl", records)
    cfg = PrepareConfig(
        inputs=[str(path)],
        tokenizer=tokenizer,
        out_dir=str(tmp_path / "store"),
        fields=FieldsSection(**(fields or {})),
        **{"seq_length": 64, **kw},
    )
    assert cfg.problems() == []
    report = run_prepare(cfg, quiet=True)
    return report, PackedStore(tmp_path / "store")


def documents(store: PackedStore) -> list[dict[str, np.ndarray]]:
    """Every document of the store, in record order: its tokens, label-aligned mask and teacher."""
    out = []
    for k, name in enumerate(store.shards):
        docs = np.load(store.path / "shards" / name / "documents.npy")
        for row, start, length, index in docs:
            cols = store.row(int(store.offsets[k] + row))
            sl = slice(int(start), int(start + length))
            out.append({"index": int(index), **{n: c[sl] for n, c in cols.items()}})
    return sorted(out, key=lambda d: d["index"])


PROMPT = "<s> user w1 w2 </s> <s> assistant"


def test_prompt_response_mask_is_on_response_and_end_of_turn_only(tmp_path: Path, tokenizer: str) -> None:
    report, store = prepare(tmp_path, tokenizer, [{"prompt": "w1 w2", "response": "w3 w4 w5"}])
    (doc,) = documents(store)
    assert doc["tokens"].tolist() == ids(f"{PROMPT} w3 w4 w5 </s>")
    # Label-aligned: position t is trained when token t + 1 (w3 w4 w5 </s>) is; the last never.
    assert doc["loss_mask"].tolist() == [0] * 6 + [1, 1, 1, 1] + [0]
    assert report["records_kept"] == 1 and report["loss_tokens"] == 4 and report["skipped"] == {}
    assert "teacher_logprobs" not in store[0]


def test_messages_multi_turn_trains_assistant_turns_only(tmp_path: Path, tokenizer: str) -> None:
    chat = {
        "conv": [
            {"from": "system", "value": "w9"},
            {"from": "user", "value": "w1"},
            {"from": "assistant", "value": "w2 w3"},
            {"from": "user", "value": "w4"},
            {"from": "assistant", "value": "w5"},
        ]
    }
    fields = {"layout": "messages", "messages": "conv", "role_key": "from", "content_key": "value"}
    text = (
        "<s> system w9 </s> <s> user w1 </s> <s> assistant w2 w3 </s> <s> user w4 </s> <s> assistant w5 </s>"
    )
    for train_on, trained in (("all_assistant", {"w2", "w3", "w5"}), ("last_assistant", {"w5"})):
        _, store = prepare(tmp_path / train_on, tokenizer, [chat], fields, train_on=train_on)
        (doc,) = documents(store)
        words = text.split()
        assert doc["tokens"].tolist() == ids(text)
        assistant_end = {i for i, w in enumerate(words) if w == "</s>" and words[i - 1] in trained}
        expect = [int(words[t + 1] in trained or (t + 1) in assistant_end) for t in range(len(words) - 1)]
        assert doc["loss_mask"].tolist() == [*expect, 0]


def test_teacher_token_ids_and_logprobs_align_to_labels(tmp_path: Path, tokenizer: str) -> None:
    lps = [-0.5, -1.0, -1.5, -0.25]
    rec = {"prompt": "w1 w2", "response": "w3 w4 w5", "ids": ids("w3 w4 w5 </s>"), "lps": lps}
    report, store = prepare(tmp_path, tokenizer, [rec], {"teacher_tokens": "ids", "teacher_logprobs": "lps"})
    (doc,) = documents(store)
    trained = doc["loss_mask"].astype(bool)
    assert doc["teacher_logprobs"][trained].tolist() == lps
    assert report["teacher_filled_tokens"] == 0
    assert store.manifest["columns"]["teacher_logprobs"] is not None
    assert store.manifest["columns"]["teacher_topk_ids"] is None


def test_teacher_strings_entries_and_logprobs_only(tmp_path: Path, tokenizer: str) -> None:
    """OpenAI-style entries with token strings; log-probs alone for the content only: the end-of-turn
    token the engine did not report gets teacher_fill_logprob and is counted."""
    entries = [
        {"token": t, "logprob": lp} for t, lp in zip(["w3", " w4", "w5 "], [-0.5, -1.0, -1.5], strict=True)
    ]
    rec = {"prompt": "w1 w2", "response": "w3 w4 w5", "choice": {"logprobs": {"content": entries}}}
    report, store = prepare(
        tmp_path / "a",
        tokenizer,
        [rec],
        {"teacher_entries": "choice.logprobs.content"},
        teacher_fill_logprob=-2.0,
    )
    (doc,) = documents(store)
    assert doc["teacher_logprobs"][doc["loss_mask"].astype(bool)].tolist() == [-0.5, -1.0, -1.5, -2.0]
    assert report["teacher_filled_tokens"] == 1
    rec = {"prompt": "w1 w2", "response": "w3 w4 w5", "lps": [-0.5, -1.0, -1.5]}
    report, store = prepare(tmp_path / "b", tokenizer, [rec], {"teacher_logprobs": "lps"})
    assert documents(store)[0]["teacher_logprobs"][
        documents(store)[0]["loss_mask"].astype(bool)
    ].tolist() == [
        -0.5,
        -1.0,
        -1.5,
        0.0,
    ]


def test_parquet_and_saved_dataset_give_the_same_store_as_jsonl(tmp_path: Path, tokenizer: str) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [record(i, words=2 + i % 7) for i in range(40)]
    _, ref = prepare(tmp_path / "jsonl", tokenizer, records, records_per_shard=13)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "t.parquet", row_group_size=7)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "dd"))
    for name, extra in (("t.parquet", {}), ("ds", {}), ("dd", {"hf_split": "train"})):
        cfg = PrepareConfig(
            inputs=[str(tmp_path / name)],
            tokenizer=tokenizer,
            seq_length=64,
            records_per_shard=13,
            out_dir=str(tmp_path / f"out_{name}"),
            **extra,
        )
        run_prepare(cfg, quiet=True)
        store = PackedStore(cfg.out_dir)
        assert len(store) == len(ref)
        for i in range(len(ref)):
            assert all(np.array_equal(store.row(i)[c], ref.row(i)[c]) for c in ref.columns), (name, i)
    with pytest.raises(DataError, match="set hf_split"):
        run_prepare(
            PrepareConfig(inputs=[str(tmp_path / "dd")], tokenizer=tokenizer, out_dir=str(tmp_path / "x"))
        )


def test_answer_filter_keeps_only_matching_traces(tmp_path: Path, tokenizer: str) -> None:
    records = [
        {"prompt": "w1", "response": "w2 \\boxed{12}", "ref": "12"},
        {"prompt": "w1", "response": "w2 \\boxed{12}", "ref": "w5 w6 #### 12"},  # GSM8K-style reference
        {"prompt": "w1", "response": "w2 \\boxed{13}", "ref": "12"},
        {"prompt": "w1", "response": "w2 w3", "ref": "12"},
        {"prompt": "w1", "response": "w2 #### 12", "ref": 12},
    ]
    report, _ = prepare(tmp_path, tokenizer, records, {"reference": "ref"}, answer_filter="auto")
    assert report["records_kept"] == 3
    assert report["skipped"] == {"no_answer": 1, "wrong_answer": 1}
    assert report["skip_examples"]["wrong_answer"][0].startswith(f"{tmp_path}/traces.jsonl:3: answer '13'")


def test_answer_extraction_and_normalisation() -> None:
    assert extract_boxed("so \\boxed{1} then \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{\\text{a {b} c}}") == "\\text{a {b} c}"
    assert extract_boxed("\\boxed{unclosed") is None and extract_boxed("none") is None
    assert extract_answer("steps\n#### 1,234\nmore", "gsm8k") == "1,234"
    assert extract_answer("#### 5 and \\boxed{7}", "auto") == "7"
    assert extract_answer("no answer", "auto") is None
    assert normalize_answer("$1,234.$") == "1234" and normalize_answer("\\text{ 0.50 }") == "0.5"
    assert answers_match("\\dfrac{1}{2}", "\\frac {1}{2}") and answers_match("12.0", "12")
    assert not answers_match("12", "13") and normalize_answer("inf") == "inf"


def test_config_problems_are_reported_together() -> None:
    cfg = PrepareConfig(
        seq_length=1,
        workers=0,
        answer_filter="boxed",
        packing="random",
        teacher_fill_logprob=0.5,
        fields=FieldsSection(teacher_tokens="ids", teacher_entries="e"),
    )
    text = "\n".join(cfg.problems())
    for needle in (
        "inputs: list at least one",
        "tokenizer: set the student's",
        "seq_length=1",
        "workers=0",
        "needs fields.reference",
        "packing='random'",
        "teacher_fill_logprob=0.5",
        "fields.teacher_entries and fields.teacher_tokens",
        "fields.teacher_tokens is set without",
    ):
        assert needle in text, (needle, text)


# --- the bad-input suite: one test per case, in both policies where both apply -------------------

GOOD = {"prompt": "w1", "response": "w2 w3"}
TEACHER = {"teacher_tokens": "ids", "teacher_logprobs": "lps"}


def _with_teacher(lps: list[float], tokens: str = "w2 w3 </s>") -> dict[str, Any]:
    return {**GOOD, "ids": ids(tokens), "lps": lps}


BAD_CASES: dict[str, tuple[Any, dict[str, Any], str, str]] = {
    # id: (bad record, field mapping, reason, what the message says)
    "malformed_json": ('{"prompt": "w1", "response": ', {}, "malformed_json", "Expecting value"),
    "not_an_object": ("[1, 2]", {}, "not_an_object", "expected a JSON object, got list"),
    "missing_field": ({"prompt": "w1"}, {}, "missing_field", "no field 'response' (keys: prompt)"),
    "null_field": ({"prompt": "w1", "response": None}, {}, "missing_field", "field 'response' is null"),
    "mistyped_response": ({"prompt": "w1", "response": 7}, {}, "wrong_type", "expected a string, got int"),
    "mistyped_messages": (
        {"messages": "w1"},
        {"layout": "messages"},
        "wrong_type",
        "messages: expected a list of turns",
    ),
    "turn_without_role": (
        {"messages": [{"content": "w1"}]},
        {"layout": "messages"},
        "missing_field",
        "no field 'role'",
    ),
    "no_assistant_turn": (
        {"messages": [{"role": "user", "content": "w1"}]},
        {"layout": "messages"},
        "no_assistant_turn",
        "no turn with role 'assistant'",
    ),
    "empty_response": ({"prompt": "w1", "response": " \n "}, {}, "empty_response", "assistant turn is empty"),
    "lone_surrogate": ('{"prompt": "w1", "response": "w2 \\ud800"}', {}, "not_utf8", "not valid Unicode"),
    "nan_logprob": (_with_teacher([-1.0, float("nan"), -1.0]), TEACHER, "nonfinite_logprobs", "lps[1] = nan"),
    "inf_logprob": (
        _with_teacher([-1.0, -1.0, float("-inf")]),
        TEACHER,
        "nonfinite_logprobs",
        "lps[2] = -inf",
    ),
    "positive_logprob": (_with_teacher([-1.0, 0.5, -1.0]), TEACHER, "positive_logprobs", "lps[1] = 0.5 > 0"),
    "string_logprob": (_with_teacher([-1.0, "x", -1.0]), TEACHER, "wrong_type", "lps[1]: expected a number"),  # type: ignore[list-item]
    "length_mismatch": (
        _with_teacher([-1.0, -1.0]),
        TEACHER,
        "logprob_length_mismatch",
        "3 teacher tokens but 2",
    ),
    "lps_only_wrong_count": (
        {**GOOD, "lps": [-1.0] * 7},
        {"teacher_logprobs": "lps"},
        "logprob_length_mismatch",
        "7 teacher log-probs, but the response has 2 tokens (3 with",
    ),
    "tokens_disagree": (
        _with_teacher([-1.0] * 3, "w2 w4 </s>"),
        TEACHER,
        "teacher_tokens_mismatch",
        "engine token 1 is",
    ),
    "too_many_tokens": (
        _with_teacher([-1.0] * 5, "w2 w3 </s> w1 w1"),
        TEACHER,
        "teacher_tokens_mismatch",
        "5 engine tokens, 3 in the turn",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_is_counted_and_named(tmp_path: Path, tokenizer: str, case: str) -> None:
    bad, fields, reason, message = BAD_CASES[case]
    fields_good = GOOD if not fields.get("teacher_logprobs") else _with_teacher([-1.0] * 3)
    if fields.get("layout") == "messages":
        fields_good = {
            "messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
        }
    if fields == {"teacher_logprobs": "lps"}:
        fields_good = {**GOOD, "lps": [-1.0, -1.0]}
    records = [fields_good, bad, "", fields_good]  # a blank line is not a record, and not counted
    report, store = prepare(tmp_path / "skip", tokenizer, records, fields)
    assert report["records_read"] == 3 and report["records_kept"] == 2
    assert report["skipped"] == {reason: 1}
    where = f"{tmp_path}/skip/traces.jsonl:2: "
    assert report["skip_examples"][reason][0].startswith(where), report["skip_examples"]
    assert message in report["skip_examples"][reason][0]
    assert len(store) >= 1
    with pytest.raises(DataError) as err:
        prepare(tmp_path / "error", tokenizer, records, fields, on_bad_record="error")
    assert f"{tmp_path}/error/traces.jsonl:2: {reason}: " in str(err.value) and message in str(err.value)
    assert not (tmp_path / "error" / "store" / "manifest.json").exists()


def test_non_utf8_bytes_name_the_line(tmp_path: Path, tokenizer: str) -> None:
    path = tmp_path / "traces.jsonl"
    path.write_bytes(
        json.dumps(GOOD).encode()
        + b"\n"
        + b'{"prompt": "w1", "response": "w2 \xff\xfe"}\n'
        + json.dumps(GOOD).encode()
    )
    cfg = PrepareConfig(
        inputs=[str(path)], tokenizer=tokenizer, out_dir=str(tmp_path / "store"), seq_length=64
    )
    report = run_prepare(cfg, quiet=True)
    assert report["skipped"] == {"not_utf8": 1}
    assert report["skip_examples"]["not_utf8"] == [f"{path}:2: byte offset 33 in the line is not UTF-8"]
    cfg.on_bad_record, cfg.out_dir = "error", str(tmp_path / "store2")
    with pytest.raises(DataError, match=f"{path}:2: not_utf8: byte offset 33 in the line is not UTF-8"):
        run_prepare(cfg, quiet=True)


def test_tiny_positive_logprob_is_rounding_and_clamped(tmp_path: Path, tokenizer: str) -> None:
    _, store = prepare(tmp_path, tokenizer, [_with_teacher([-1.0, 5e-5, -1.0])], TEACHER)
    (doc,) = documents(store)
    assert doc["teacher_logprobs"][doc["loss_mask"].astype(bool)].tolist() == [-1.0, 0.0, -1.0]


def test_overlong_traces_truncated_or_dropped_and_counted(tmp_path: Path, tokenizer: str) -> None:
    long = {"prompt": "w1", "response": " ".join(["w2"] * 30)}  # 6 + 30 + 1 = 37 tokens
    report, store = prepare(tmp_path / "t", tokenizer, [GOOD, long], seq_length=16)
    assert report["records_kept"] == 2 and report["truncated"] == 1 and report["skipped"] == {}
    doc = documents(store)[1]
    assert doc["tokens"].tolist() == ids(f"<s> user w1 </s> <s> assistant {' '.join(['w2'] * 10)}")
    assert doc["loss_mask"].tolist() == [0] * 5 + [1] * 10 + [0]
    report, _ = prepare(tmp_path / "d", tokenizer, [GOOD, long], seq_length=16, overlong="drop")
    assert report["records_kept"] == 1 and report["skipped"] == {"too_long": 1}
    assert "37 tokens > seq_length=16" in report["skip_examples"]["too_long"][0]
    # A prompt that fills the row leaves nothing to train: skipped, never an all-masked document.
    report, _ = prepare(
        tmp_path / "p", tokenizer, [GOOD, {"prompt": " ".join(["w1"] * 20), "response": "w2"}], seq_length=16
    )
    assert report["skipped"] == {"no_trainable_tokens": 1}
    # on_bad_record=error is for broken records, not for policy: too_long is still only counted.
    report, _ = prepare(
        tmp_path / "e", tokenizer, [GOOD, long], seq_length=16, overlong="drop", on_bad_record="error"
    )
    assert report["skipped"] == {"too_long": 1}


def test_unusable_inputs_and_tokenizers_are_errors(tmp_path: Path, tokenizer: str) -> None:
    traces = write_jsonl(tmp_path / "t.jsonl", [GOOD])
    base = {"tokenizer": tokenizer, "out_dir": str(tmp_path / "s")}
    with pytest.raises(DataError, match=r"no_such\.jsonl: no such file"):
        run_prepare(PrepareConfig(inputs=[str(tmp_path / "no_such.jsonl")], **base))
    with pytest.raises(DataError, match="matches no file"):
        run_prepare(PrepareConfig(inputs=[str(tmp_path / "*.parquet")], **base))
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unknown suffix '\.csv'; set format"):
        run_prepare(PrepareConfig(inputs=[str(tmp_path / "t.csv")], **base))
    with pytest.raises(DataError, match=r"no tokenizer\.json"):
        run_prepare(PrepareConfig(inputs=[str(traces)], tokenizer=str(tmp_path), out_dir=base["out_dir"]))
    bare = make_tokenizer(tmp_path / "bare", chat_template=None)
    with pytest.raises(DataError, match="has no chat template: set chat_template"):
        run_prepare(PrepareConfig(inputs=[str(traces)], tokenizer=bare, out_dir=base["out_dir"]))
    # ... which a config can supply.
    template = "{% for m in messages %}{{ m['content'] }} </s> {% endfor %}"
    report = run_prepare(
        PrepareConfig(
            inputs=[str(traces)], tokenizer=bare, chat_template=template, **{"out_dir": base["out_dir"]}
        ),
        quiet=True,
    )
    assert report["records_kept"] == 1


def test_template_that_rewrites_earlier_turns_is_reported(tmp_path: Path, tokenizer: str) -> None:
    """A template that renders past assistant turns differently (as Qwen3 drops their reasoning)."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<s> assistant w0 </s> "
        "{% else %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    chat = {
        "messages": [
            {"role": "user", "content": "w1"},
            {"role": "assistant", "content": "w2"},
            {"role": "user", "content": "w3"},
            {"role": "assistant", "content": "w4"},
        ]
    }
    fields = {"layout": "messages"}
    # Both skipped: nothing usable is an error (see test_bad_inputs.py), with the counts and an example.
    with pytest.raises(DataError, match=r"skipped: template_error 2 \(e\.g\. .*set train_on=last_assistant"):
        prepare(tmp_path / "a", tokenizer, [chat, chat], fields, chat_template=template)
    report, store = prepare(
        tmp_path / "b", tokenizer, [chat], fields, chat_template=template, train_on="last_assistant"
    )
    (doc,) = documents(store)
    assert doc["tokens"][doc["loss_mask"].astype(bool).nonzero()[0] + 1].tolist() == ids("w4 </s>")
    assert math.isclose(report["loss_tokens"], 2)


def test_parquet_bytes_that_are_not_utf8_name_the_row(tmp_path: Path, tokenizer: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": [b"w1", b"w1", b"w1"], "response": [b"w2", b"w2 \xff", b"w3"]})
    pq.write_table(table, tmp_path / "t.parquet")
    cfg = PrepareConfig(
        inputs=[str(tmp_path / "t.parquet")], tokenizer=tokenizer, out_dir=str(tmp_path / "s")
    )
    report = run_prepare(cfg, quiet=True)
    assert report["records_kept"] == 2 and report["skipped"] == {"not_utf8": 1}
    assert report["skip_examples"]["not_utf8"] == [
        f"{tmp_path}/t.parquet[row 1]: response: byte 3 is not UTF-8"
    ]


def test_byte_level_bpe_chatml_mask_and_engine_tokens(tmp_path: Path) -> None:
    """A realistic tokenizer: byte-level BPE with a ChatML template. The trained tokens are exactly
    the response, <|im_end|> and its newline; engine ids (response + <|im_end|>, tokenized alone)
    and engine strings (each token decoded) both align; the newline is filled and counted."""
    from transformers import PreTrainedTokenizerFast

    path = make_bpe_tokenizer(tmp_path / "bpe")
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    response = "Déjà vu: 6 times 7 equals 42, then \\boxed{42}."
    engine = tok(response + "<|im_end|>", add_special_tokens=False).input_ids
    lps = [-0.1 * (i + 1) for i in range(len(engine))]
    records = [
        {"prompt": "compute step by step", "response": response, "ids": engine, "lps": lps},
        {
            "prompt": "compute step by step",
            "response": response,
            "entries": [{"token": tok.decode([t]), "logprob": lp} for t, lp in zip(engine, lps, strict=True)],
        },
    ]
    for name, fields in (("ids", TEACHER), ("entries", {"teacher_entries": "entries"})):
        cfg = PrepareConfig(
            inputs=[
                str(write_jsonl(tmp_path / f"{name}.jsonl", records[:1] if name == "ids" else records[1:]))
            ],
            tokenizer=path,
            out_dir=str(tmp_path / name),
            fields=FieldsSection(**fields),
            teacher_fill_logprob=-9.0,
        )
        report = run_prepare(cfg, quiet=True)
        assert report["records_kept"] == 1 and report["teacher_filled_tokens"] == 1, report
        (doc,) = documents(PackedStore(cfg.out_dir))
        chat = [
            {"role": "user", "content": "compute step by step"},
            {"role": "assistant", "content": response},
        ]
        text = tok.apply_chat_template(chat, tokenize=False)
        assert doc["tokens"].tolist() == tok(text, add_special_tokens=False).input_ids
        trained_labels = doc["tokens"][np.flatnonzero(doc["loss_mask"]) + 1].tolist()
        assert tok.decode(trained_labels) == response + "<|im_end|>\n"
        assert doc["teacher_logprobs"][doc["loss_mask"].astype(bool)].tolist() == pytest.approx([*lps, -9.0])
