"""prepare, the store side: packing exactness, masks, boundaries, the batch format, atomic and
resumable writes, idempotent re-runs, several workers equal one, and the CLI stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.paths import ROOT
from helpers.trace_fixtures import make_tokenizer, record, write_jsonl

from nemo_dcod.config import to_yaml
from nemo_dcod.data.config import PrepareConfig
from nemo_dcod.data.prepare import run_prepare
from nemo_dcod.data.readers import DataError
from nemo_dcod.data.store import (
    IncompleteStoreError,
    PackedStore,
    block_causal_attention_mask,
    collate_packed,
    cu_seqlens,
    pack_documents,
)
from nemo_dcod.data.tokenize import Document


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 records of varied lengths, a few bad ones among them."""
    records: list[Any] = [record(i, words=1 + (i * 37) % 50) for i in range(120)]
    records[17] = "{not json"
    records[60] = {"prompt": "w1", "response": ""}
    return write_jsonl(tmp_path_factory.mktemp("in") / "traces.jsonl", records)


def config(traces: Path, tokenizer: str, out: Path, **kw: Any) -> PrepareConfig:
    return PrepareConfig(
        inputs=[str(traces)],
        tokenizer=tokenizer,
        out_dir=str(out),
        **{"seq_length": 64, "records_per_shard": 25, **kw},
    )


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store but the report (which holds timings)."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "report.json"
    }


def random_documents(n: int, seq_length: int, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        length = int(rng.integers(2, seq_length + 1))
        trained = rng.random(length) < 0.6
        trained[0] = False
        docs.append(
            Document(
                index=i,
                tokens=rng.integers(4, 1000, length).astype(np.int32),
                trained=trained,
                teacher_logprobs=-rng.random(length).astype(np.float32),
            )
        )
    return docs


@pytest.mark.parametrize("policy", ["best_fit", "sequential"])
def test_packing_is_exact_nothing_lost_or_duplicated(policy: str) -> None:
    s, pad = 48, 3
    docs = random_documents(200, s)
    packed = pack_documents(docs, s, pad, policy)
    cols = packed.columns
    covered = np.zeros(cols["tokens"].shape, dtype=int)
    assert sorted(packed.documents[:, 3].tolist()) == list(range(len(docs)))  # each placed exactly once
    for row, start, length, index in packed.documents:
        doc, sl = docs[index], slice(start, start + length)
        covered[row, sl] += 1
        assert np.array_equal(cols["tokens"][row, sl], doc.tokens)
        segs = cols["segment_ids"][row, sl]
        assert (segs == segs[0]).all() and (segs >= 0).all()
        # Label-aligned: trained[t + 1] at t; the document's last position never trains (its label
        # would be the next document's first token).
        assert cols["loss_mask"][row, sl].tolist() == [*doc.trained[1:].astype(int), 0]
        assert np.array_equal(
            cols["teacher_logprobs"][row, start : start + length - 1], doc.teacher_logprobs[1:]
        )
    assert covered.max() == 1  # no overlaps
    padding = covered == 0
    assert (cols["segment_ids"][padding] == -1).all() and (cols["tokens"][padding] == pad).all()
    assert (cols["loss_mask"][padding] == 0).all()
    assert int((~padding).sum()) == sum(len(d.tokens) for d in docs)
    # Documents of a row are contiguous from position 0, numbered 0, 1, ... in order.
    for r in range(packed.rows):
        segs = cols["segment_ids"][r]
        real = segs[segs >= 0]
        assert (segs[: len(real)] >= 0).all() and (np.diff(real) >= 0).all() and real[0] == 0
        assert set(np.diff(real).tolist()) <= {0, 1}


def test_best_fit_packs_tighter_than_sequential() -> None:
    docs = random_documents(300, 64, seed=1)
    best = pack_documents(docs, 64, 0, "best_fit").rows
    seq = pack_documents(docs, 64, 0, "sequential").rows
    lower = -(-sum(len(d.tokens) for d in docs) // 64)
    assert lower <= best < seq and best <= 1.05 * lower + 1


def test_store_rows_are_the_training_batch_format(traces: Path, tokenizer: str, tmp_path: Path) -> None:
    report = run_prepare(config(traces, tokenizer, tmp_path / "s"), quiet=True)
    store = PackedStore(tmp_path / "s")
    assert report["records_read"] == 120 and report["records_kept"] == 118
    assert report["skipped"] == {"empty_response": 1, "malformed_json": 1}
    assert len(store) == report["rows"] and 0.8 < report["packing_efficiency"] <= 1
    saved = json.loads((tmp_path / "s" / "report.json").read_text())
    assert saved["rows"] == report["rows"] and saved["skipped"] == report["skipped"]
    real = 0
    for i in range(len(store)):
        x = store[i]
        assert set(x) == {"tokens", "labels", "position_ids", "loss_mask", "segment_ids"}
        assert all(v.shape == (64,) for v in x.values())
        assert x["tokens"].dtype == x["labels"].dtype == x["position_ids"].dtype == torch.int64
        seg, tok, lab, pos = x["segment_ids"], x["tokens"], x["labels"], x["position_ids"]
        real += int((seg >= 0).sum())
        for t in range(64):
            first = t == 0 or seg[t] != seg[t - 1]
            assert pos[t] == (0 if first else pos[t - 1] + 1)
            same_next = t < 63 and seg[t + 1] == seg[t] and seg[t] >= 0
            assert lab[t] == (tok[t + 1] if same_next else store.pad_token_id)
            if not same_next:
                assert x["loss_mask"][t] == 0  # no loss across a boundary, on padding, or at the end
    assert real == report["tokens"] == store.manifest["counts"]["tokens"]


def test_block_causal_mask_and_cu_seqlens() -> None:
    seg = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    mask = block_causal_attention_mask(seg)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(6):
            for j in range(6):
                allowed = bool(seg[b, i] == seg[b, j]) and j <= i
                assert bool(mask[b, 0, i, j]) == (not allowed)  # True = masked out
    assert cu_seqlens(seg).tolist() == [0, 3, 5, 6, 12]
    sample = {"segment_ids": seg[0], "tokens": seg[0].clone()}
    batch = collate_packed([sample, sample], attention_mask=True)
    assert batch["tokens"].shape == (2, 6) and torch.equal(batch["attention_mask"][1], mask[0])


def test_packed_documents_attend_as_if_alone() -> None:
    """Through a model: a causal self-attention layer with RoPE, given the block mask and restarted
    positions, gives each packed document exactly the outputs it has alone."""
    torch.manual_seed(0)
    d = 16
    qkv = torch.nn.Linear(d, 3 * d, dtype=torch.float64)
    emb = torch.nn.Embedding(100, d, dtype=torch.float64)

    def attend(tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = qkv(emb(tokens)).chunk(3, dim=-1)
        freqs = positions[:, None].double() * 10000 ** (-torch.arange(0, d, 2).double() / d)
        cos, sin = freqs.cos().repeat(1, 2), freqs.sin().repeat(1, 2)

        def rope(x: torch.Tensor) -> torch.Tensor:
            return x * cos + torch.cat([-x[:, d // 2 :], x[:, : d // 2]], -1) * sin

        scores = rope(q) @ rope(k).T / d**0.5
        if mask is None:
            mask = ~torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
        return torch.softmax(scores.masked_fill(mask, float("-inf")), -1) @ v

    docs = random_documents(12, 20, seed=2)
    for doc in docs:
        doc.tokens %= 100
    packed = pack_documents(docs, 40, 0)
    for row, start, length, index in packed.documents:
        seg = torch.from_numpy(packed.columns["segment_ids"][row]).long()
        tokens = torch.from_numpy(packed.columns["tokens"][row]).long()
        first = torch.ones(40, dtype=torch.bool)
        first[1:] = seg[1:] != seg[:-1]
        ar = torch.arange(40)
        pos = ar - torch.cummax(torch.where(first, ar, 0), 0).values
        out = attend(tokens, pos, block_causal_attention_mask(seg[None])[0, 0])
        alone = attend(torch.from_numpy(docs[index].tokens).long(), torch.arange(length), None)
        torch.testing.assert_close(out[start : start + length], alone, rtol=0, atol=1e-12)


def test_rerun_is_idempotent_and_resumes_missing_shards(traces: Path, tokenizer: str, tmp_path: Path) -> None:
    cfg = config(traces, tokenizer, tmp_path / "s")
    first = run_prepare(cfg, quiet=True)
    files = store_files(tmp_path / "s")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")}
    again = run_prepare(cfg, quiet=True)
    assert again == first  # nothing redone: the saved report comes back
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")} == mtimes
    # A lost shard (and manifest) is rebuilt alone, identical.
    import shutil

    shutil.rmtree(tmp_path / "s" / "shards" / "shard_00002")
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(IncompleteStoreError, match=r"no manifest\.json"):
        PackedStore(tmp_path / "s")
    resumed = run_prepare(cfg, quiet=True)
    assert resumed["shards_reused"] == resumed["shards"] - 1 == 4
    assert store_files(tmp_path / "s") == files
    # Other settings into a complete store: refused unless overwrite.
    other = config(traces, tokenizer, tmp_path / "s", seq_length=32)
    with pytest.raises(DataError, match="holds a complete store made from other inputs or settings"):
        run_prepare(other, quiet=True)
    other.overwrite = True
    assert run_prepare(other, quiet=True)["shards_reused"] == 0
    assert PackedStore(tmp_path / "s").seq_length == 32
    # A directory that is not a store is never written into.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match="not a store"):
        run_prepare(config(traces, tokenizer, tmp_path / "mine"), quiet=True)


def test_damaged_store_is_never_read_as_complete(traces: Path, tokenizer: str, tmp_path: Path) -> None:
    cfg = config(traces, tokenizer, tmp_path / "s")
    run_prepare(cfg, quiet=True)
    files = store_files(tmp_path / "s")
    shard = tmp_path / "s" / "shards" / "shard_00001"
    np.save(shard / "tokens.npy", np.load(shard / "tokens.npy")[:-1])  # a row short
    with pytest.raises(IncompleteStoreError, match=r"tokens\.npy: shape"):
        PackedStore(tmp_path / "s")
    assert run_prepare(cfg, quiet=True)["shards_reused"] == 4  # the damaged shard is rebuilt
    assert store_files(tmp_path / "s") == files
    (shard / "shard.json").write_text(json.dumps({"key": "other"}))
    with pytest.raises(IncompleteStoreError, match="not the shard the manifest lists"):
        PackedStore(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(IncompleteStoreError, match="version 99"):
        PackedStore(tmp_path / "s")


def test_killed_write_is_incomplete_and_resumes_to_the_same_store(
    traces: Path, tokenizer: str, tmp_path: Path
) -> None:
    """SIGKILL in the middle of writing the third shard: no manifest, a temp dir that is never read;
    the next run removes it and ends with the store an uninterrupted run makes."""
    cfg = config(traces, tokenizer, tmp_path / "killed")
    (tmp_path / "cfg.yaml").write_text(to_yaml(cfg))
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np
        import nemo_dcod.data.store as store
        from nemo_dcod.config import load_config
        from nemo_dcod.data.config import PrepareConfig
        from nemo_dcod.data.prepare import run_prepare
        calls, save = [0], np.save
        def dying_save(path, array):
            calls[0] += 1
            if calls[0] == 10:  # each shard writes 3 columns + documents: this is mid-shard 2
                os.kill(os.getpid(), signal.SIGKILL)
            save(path, array)
        store.np.save = dying_save
        run_prepare(load_config(PrepareConfig, "{tmp_path / "cfg.yaml"}"), quiet=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    out = tmp_path / "killed"
    assert not (out / "manifest.json").exists()
    assert [p.name[:17] for p in (out / "shards").iterdir() if p.name.startswith(".tmp")] == [
        ".tmp-shard_00002-"
    ]
    with pytest.raises(IncompleteStoreError):
        PackedStore(out)
    resumed = run_prepare(cfg, quiet=True)
    assert resumed["shards_reused"] == 2
    assert not any(p.name.startswith(".tmp") for p in (out / "shards").iterdir())
    run_prepare(config(traces, tokenizer, tmp_path / "clean"), quiet=True)
    assert store_files(out) == store_files(tmp_path / "clean")


def test_error_midway_leaves_no_complete_store(tmp_path: Path, tokenizer: str) -> None:
    records: list[Any] = [record(i) for i in range(60)]
    records[55] = "{broken"
    cfg = config(write_jsonl(tmp_path / "t.jsonl", records), tokenizer, tmp_path / "s", on_bad_record="error")
    with pytest.raises(DataError, match=r"t.jsonl:56: malformed_json"):
        run_prepare(cfg, quiet=True)
    assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir()) == ["shard_00000", "shard_00001"]
    with pytest.raises(IncompleteStoreError):
        PackedStore(tmp_path / "s")


def test_several_workers_write_the_same_store_as_one(traces: Path, tokenizer: str, tmp_path: Path) -> None:
    one = run_prepare(config(traces, tokenizer, tmp_path / "one"), quiet=True)
    two = run_prepare(config(traces, tokenizer, tmp_path / "two", workers=2), quiet=True)
    assert store_files(tmp_path / "one") == store_files(tmp_path / "two")
    strip = ("seconds", "tokens_per_second")
    assert {k: v for k, v in one.items() if k not in strip} == {
        k: v for k, v in two.items() if k not in strip
    }


def test_cli_prepare_runs_the_tiny_config(tmp_path: Path) -> None:
    """`nemo-dcod prepare --config conf/prepare_tiny.yaml` end to end (the shipped example data)."""
    out = tmp_path / "store"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemo_dcod.cli",
            "prepare",
            "--config",
            "conf/prepare_tiny.yaml",
            f"out_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "48 records read, 42 kept" in proc.stdout and "skipped wrong_answer: 6" in proc.stdout
    store = PackedStore(out)
    x = store[0]
    assert "teacher_logprobs" in x and bool((x["teacher_logprobs"][x["loss_mask"] > 0] < 0).all())
    bad = subprocess.run(
        [sys.executable, "-m", "nemo_dcod.cli", "prepare", "--config", "conf/prepare_tiny.yaml",
         f"out_dir={tmp_path / 'x'}", "inputs=[nowhere.jsonl]", "seq_length=1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 2 and "seq_length=1: must be >= 2" in bad.stderr
