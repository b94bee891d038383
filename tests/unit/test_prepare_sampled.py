"""prepare on what a sampling engine wrote: the sampled ids kept as they are when the student's
tokenizer is the teacher's, the stop token's log-prob on the template's end-of-turn token, and
responses cut at the engine's token limit.

A byte-level BPE tokenizer with a ChatML template (``helpers.trace_fixtures.make_bpe_tokenizer``)
stands in for a real one: a sampled sequence such as ``Ġ``, ``a``, ``n``, ``swer`` decodes to the
same text as the merged ``Ġanswer`` the tokenizer makes of it, which is what makes re-tokenizing
a sampled trace lose it (24% of the traces of a real 135M model, issue 22).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.trace_fixtures import CHATML, make_bpe_tokenizer, make_tokenizer, write_jsonl

from nemo_dcod.data.config import FieldsSection, PrepareConfig
from nemo_dcod.data.prepare import format_report, run_prepare
from nemo_dcod.data.readers import DataError, parse_record
from nemo_dcod.data.store import PackedStore
from nemo_dcod.data.tokenize import Document, TraceTokenizer, load_tokenizer, vocabulary_fingerprint

RESPONSE = "The answer is 42. Let us compute: 6 times 7 equals 42."
FIELDS = {"teacher_tokens": "ids", "teacher_logprobs": "lps", "finish_reason": "finish"}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def tok(bpe: str) -> Any:
    return load_tokenizer(bpe)


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)


def _split(tok: Any, ids: list[int]) -> list[int]:
    """``ids`` with every token of 3+ characters split into one token per character: the same text,
    another token sequence (every byte is a token of a byte-level BPE)."""
    out: list[int] = []
    for i in ids:
        piece = tok.convert_ids_to_tokens(i)
        out.extend(tok.convert_tokens_to_ids(list(piece)) if len(piece) >= 3 else [i])
    return out


def _record(
    tok: Any, sampled: list[int], stop: bool = True, finish: str = "stop", **kw: Any
) -> dict[str, Any]:
    """A trace as ``nemo-dcod generate`` writes it: the sampled ids (+ <|im_end|> when it stopped
    there) and a distinct log-prob per id (-0.01 * (k + 1))."""
    text = tok.decode(sampled, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ids = [*sampled, tok.convert_tokens_to_ids("<|im_end|>")] if stop else list(sampled)
    lps = [round(-0.01 * (k + 1), 6) for k in range(len(ids))]
    return {"prompt": "Compute 6 times 7.", "response": text, "ids": ids, "lps": lps, "finish": finish, **kw}


def _cfg(tok_path: str, tmp_path: Path, records: list[dict[str, Any]], **kw: Any) -> PrepareConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = PrepareConfig(
        inputs=[str(write_jsonl(tmp_path / "traces.jsonl", records))],
        tokenizer=tok_path,
        out_dir=str(tmp_path / "store"),
        fields=FieldsSection(**FIELDS),
        train_on="last_assistant",
        **{"seq_length": 128, **kw},
    )
    assert cfg.problems() == []
    return cfg


def _encode(cfg: PrepareConfig, records: list[dict[str, Any]]) -> list[Document | Exception]:
    traces = [parse_record(r, cfg.fields, f"t.jsonl:{k + 1}", k) for k, r in enumerate(records)]
    return list(TraceTokenizer(cfg).encode(traces))


def _documents(store: PackedStore) -> list[dict[str, np.ndarray]]:
    out = []
    for k, name in enumerate(store.shards):
        for row, start, length, index in np.load(store.path / "shards" / name / "documents.npy"):
            cols = store.row(int(store.offsets[k] + row))
            sl = slice(int(start), int(start + length))
            out.append({"index": int(index), **{n: c[sl] for n, c in cols.items()}})
    return sorted(out, key=lambda d: d["index"])


def _head(tok: Any) -> list[int]:
    """The tokens before the response: the prompt rendered with the generation prompt."""
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Compute 6 times 7."}], tokenize=False, add_generation_prompt=True
    )
    return _ids(tok, text)


def test_sampled_ids_are_kept_and_the_stop_logprob_lands_on_the_end_of_turn(
    bpe: str, tok: Any, tmp_path: Path
) -> None:
    canonical = _ids(tok, RESPONSE)
    sampled = _split(tok, canonical)
    assert len(sampled) > len(canonical) + 5  # really another token sequence of the same text
    records = [_record(tok, sampled), _record(tok, canonical)]
    fingerprint = vocabulary_fingerprint(tok)
    cfg = _cfg(bpe, tmp_path / "same", records, teacher_tokenizer_fingerprint=fingerprint)
    report = run_prepare(cfg, quiet=True)
    assert report["records_kept"] == 2 and report["skipped"] == {}, report
    assert report["stop_logprobs"] == 2 and report["teacher_filled_tokens"] == 2  # ChatML's "\n" after
    end, newline = tok.convert_tokens_to_ids("<|im_end|>"), _ids(tok, "\n")
    assert len(newline) == 1
    for doc, rec in zip(_documents(PackedStore(cfg.out_dir)), records, strict=True):
        n = len(_head(tok))
        # The document is the prompt as the teacher saw it, the ids as sampled, then the markup.
        assert doc["tokens"].tolist() == [*_head(tok), *rec["ids"], *newline]
        trained = np.flatnonzero(doc["loss_mask"])  # label positions: label t + 1
        assert trained.tolist() == list(range(n - 1, n + len(rec["ids"])))
        labels = doc["tokens"][trained + 1]
        assert labels[-2] == end and labels[-1] == newline[0]
        lps = doc["teacher_logprobs"][trained]
        np.testing.assert_allclose(lps[:-1], np.asarray(rec["lps"], dtype=np.float32))  # stop's included
        assert lps[-1] == cfg.teacher_fill_logprob  # the newline the template writes after <|im_end|>

    # Re-tokenizing the text (no fingerprint: the old way, still the way for other vocabularies)
    # loses the split trace.
    cfg = _cfg(bpe, tmp_path / "retok", records)
    report = run_prepare(cfg, quiet=True)
    assert report["skipped"] == {"teacher_tokens_mismatch": 1} and report["stop_logprobs"] == 1, report
    text = format_report(report, cfg.out_dir)
    assert "1 trained tokens filled with teacher_fill_logprob=0.0" in text
    assert "1 of 1 documents end their turn with the teacher's recorded log-prob of stopping" in text


def test_a_vocabulary_other_than_the_teachers_is_refused(bpe: str, tok: Any, tmp_path: Path) -> None:
    records = [_record(tok, _ids(tok, RESPONSE))]
    other = make_tokenizer(tmp_path / "words")
    assert vocabulary_fingerprint(load_tokenizer(other)) != vocabulary_fingerprint(tok)
    cfg = _cfg(
        bpe,
        tmp_path / "a",
        records,
        teacher_tokenizer_fingerprint=vocabulary_fingerprint(load_tokenizer(other)),
    )
    with pytest.raises(DataError, match=r"another .*teacher_tokenizer_fingerprint=null"):
        run_prepare(cfg, quiet=True)
    # The teacher named by its tokenizer directory: the same check.
    cfg = _cfg(bpe, tmp_path / "b", records, teacher_tokenizer=other)
    with pytest.raises(DataError, match="would mean other tokens"):
        run_prepare(cfg, quiet=True)
    cfg = _cfg(bpe, tmp_path / "c", records, teacher_tokenizer=bpe)
    assert run_prepare(cfg, quiet=True)["stop_logprobs"] == 1
    # The dry run refuses it too (before a job is queued).
    from nemo_dcod.config import ConfigError
    from nemo_dcod.data.dry_run import dry_run_prepare

    cfg = _cfg(bpe, tmp_path / "d", records, teacher_tokenizer=other)
    with pytest.raises(ConfigError, match="would mean other tokens"):
        dry_run_prepare(cfg)
    # The fingerprint vouches for token ids: it needs them mapped.
    bad = PrepareConfig(inputs=["x"], tokenizer=bpe, teacher_tokenizer_fingerprint="0" * 64)
    bad.fields.teacher_logprobs = "lps"
    assert any(
        "teacher_tokenizer_fingerprint is set without fields.teacher_tokens" in p for p in bad.problems()
    )


def test_the_fingerprint_is_the_vocabulary_whatever_class_loads_it(bpe: str, tok: Any) -> None:
    from transformers import AutoTokenizer

    assert vocabulary_fingerprint(AutoTokenizer.from_pretrained(bpe)) == vocabulary_fingerprint(tok)
    changed = load_tokenizer(bpe)
    changed.add_tokens(["<|tool|>"])  # one token more: ids past the vocabulary mean something else
    assert vocabulary_fingerprint(changed) != vocabulary_fingerprint(tok)


def test_sampled_ids_that_are_not_the_response_are_mismatches(bpe: str, tok: Any, tmp_path: Path) -> None:
    ids = _ids(tok, RESPONSE)
    wrong_text = _record(tok, ids, response="The answer is 41.")
    wrong_stop = _record(tok, ids)
    wrong_stop["ids"][-1] = tok.convert_tokens_to_ids("<|endoftext|>")  # not the template's end of turn
    out_of_vocab = _record(tok, [*ids[:-1], len(tok) + 3])
    cfg = _cfg(bpe, tmp_path, [], teacher_tokenizer_fingerprint=vocabulary_fingerprint(tok))
    errors = _encode(cfg, [wrong_text, wrong_stop, out_of_vocab])
    assert [getattr(e, "reason", None) for e in errors] == ["teacher_tokens_mismatch"] * 3, errors
    assert "do not decode to the response" in str(errors[0]) and "'<|im_end|>'" in str(errors[1])
    assert "not in the tokenizer's vocabulary" in str(errors[2])


@pytest.mark.parametrize("same_vocabulary", [True, False])
def test_cut_off_responses_are_dropped_or_kept_without_an_end_of_turn(
    bpe: str, tok: Any, tmp_path: Path, same_vocabulary: bool
) -> None:
    ids = _ids(tok, RESPONSE)[:9]  # cut mid-sentence at the engine's token limit
    cut = _record(tok, ids, stop=False, finish="length")
    done = _record(tok, _ids(tok, RESPONSE))
    extra = {"teacher_tokenizer_fingerprint": vocabulary_fingerprint(tok)} if same_vocabulary else {}
    cfg = _cfg(bpe, tmp_path / "drop", [cut, done], **extra)
    report = run_prepare(cfg, quiet=True)
    assert report["skipped"] == {"cut_off": 1} and report["records_kept"] == 1, report
    assert "cut at the engine's token limit" in report["skip_examples"]["cut_off"][0]

    cfg = _cfg(bpe, tmp_path / "keep", [cut, done], cut_off="keep", **extra)
    report = run_prepare(cfg, quiet=True)
    assert report["records_kept"] == 2 and report["cut_off_kept"] == 1 and report["stop_logprobs"] == 1
    assert report["teacher_filled_tokens"] == 1  # the stopped one's newline; nothing of the cut one
    first = _documents(PackedStore(cfg.out_dir))[0]
    # The document ends with the last sampled token: no <|im_end|>, no newline, nothing filled.
    assert first["tokens"].tolist() == [*_head(tok), *ids]
    trained = np.flatnonzero(first["loss_mask"])
    np.testing.assert_allclose(first["teacher_logprobs"][trained], np.asarray(cut["lps"], dtype=np.float32))
    # Without a finish reason mapped, nothing is known to be cut: kept with the end-of-turn markup.
    plain = PrepareConfig(
        inputs=[str(write_jsonl(tmp_path / "plain.jsonl", [cut]))],
        tokenizer=bpe,
        out_dir=str(tmp_path / "plain"),
        fields=FieldsSection(teacher_tokens="ids", teacher_logprobs="lps"),
        seq_length=128,
        **extra,
    )
    report = run_prepare(plain, quiet=True)
    assert report["records_kept"] == 1 and report["cut_off_kept"] == 0, report


def test_a_template_that_trims_the_response_still_takes_the_sampled_ids(tmp_path: Path) -> None:
    """Llama 3's template writes ``content | trim``: a response sampled with a trailing newline is
    rendered without it, and the sampled ids (newline included) go where the trimmed text is."""
    path = make_bpe_tokenizer(tmp_path / "trim")
    tok = load_tokenizer(path, CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}"))
    tok.save_pretrained(path)
    sampled = _ids(tok, RESPONSE + "\n")
    rec = _record(tok, sampled)
    cfg = _cfg(path, tmp_path, [], teacher_tokenizer_fingerprint=vocabulary_fingerprint(tok))
    (doc,) = _encode(cfg, [rec])
    assert isinstance(doc, Document) and doc.stop_logprob and doc.filled == 1
    assert doc.tokens.tolist() == [*_head(tok), *rec["ids"], *_ids(tok, "\n")]
    # Re-tokenizing the trimmed rendering could not place them.
    retok = _cfg(path, tmp_path / "r", [])
    (err,) = _encode(retok, [rec])
    assert getattr(err, "reason", None) == "teacher_tokens_mismatch"
