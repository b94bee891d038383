"""THD metadata of real store rows: boundaries, the context-parallel padding, the partition.

A store is prepared from real trace files; for its rows, the THD metadata must equal the document
boundaries that prepare recorded (``documents.npy``), the padded layout must move every field with
its token (and nothing else), and the context-parallel partition must give every position to
exactly one rank, in megatron-core's balanced chunk order.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from helpers.trace_fixtures import make_tokenizer, record, write_jsonl

from nemo_dcod.data.config import PrepareConfig
from nemo_dcod.data.prepare import run_prepare
from nemo_dcod.data.store import PackedStore
from nemo_dcod.data.thd import (
    collate_thd,
    cp_partition_index,
    pad_row,
    padded_length,
    row_multiple,
    store_row_length,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> PackedStore:
    root = tmp_path_factory.mktemp("thd")
    records: list[Any] = [record(i, words=1 + (i * 37) % 23) for i in range(60)]
    traces = write_jsonl(root / "traces.jsonl", records)
    cfg = PrepareConfig(
        inputs=[str(traces)],
        tokenizer=make_tokenizer(root / "tok"),
        out_dir=str(root / "store"),
        seq_length=64,
        records_per_shard=20,
    )
    run_prepare(cfg, quiet=True)
    return PackedStore(cfg.out_dir)


def _documents(store: PackedStore) -> dict[int, list[tuple[int, int]]]:
    """row -> [(start, length)] of its documents, from each shard's documents.npy."""
    out: dict[int, list[tuple[int, int]]] = {}
    for k, name in enumerate(store.shards):
        docs = np.load(store.path / "shards" / name / "documents.npy")
        for row, start, length, _ in docs.tolist():
            out.setdefault(int(store.offsets[k]) + row, []).append((start, length))
    return {row: sorted(v) for row, v in out.items()}


def test_cu_seqlens_are_the_documents_prepare_recorded(store: PackedStore) -> None:
    documents = _documents(store)
    assert any(len(d) > 2 for d in documents.values())  # the store really packs
    for row in range(len(store)):
        batch = collate_thd([store[row]], doc_multiple=1, row_length=store.seq_length)
        cu = batch["cu_seqlens"][0].tolist()
        starts = [s for s, _ in documents[row]]
        end = sum(n for _, n in documents[row])
        runs = [*starts, end] if end == store.seq_length else [*starts, end, store.seq_length]
        assert cu == runs, row
        assert "cu_seqlens_padded" not in batch and "attention_mask" not in batch
        assert batch["tokens"].shape == (1, store.seq_length)
        assert int(batch["max_seqlen"]) == max(b - a for a, b in itertools.pairwise(cu))


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_padding_moves_every_field_with_its_token(store: PackedStore, cp: int) -> None:
    doc_multiple, row_mult = row_multiple(cp)
    assert (doc_multiple, row_mult) == (2 * cp, 2 * cp)
    length = store_row_length(store.path, store.seq_length, doc_multiple, row_mult)
    assert length == max(
        padded_length(store[r]["segment_ids"], doc_multiple, row_mult) for r in range(len(store))
    )
    for row in range(len(store)):
        sample = store[row]
        batch = collate_thd([sample], doc_multiple, length)
        cu, padded = batch["cu_seqlens"][0].long(), batch["cu_seqlens_padded"][0].long()
        assert batch["tokens"].shape == (1, length) and int(padded[-1]) == length
        assert bool(((padded[1:] - padded[:-1]) % doc_multiple == 0).all())
        lengths = cu[1:] - cu[:-1]
        assert bool((padded[1:] - padded[:-1] >= lengths).all())
        for i, n in enumerate(lengths.tolist()):
            src, dst = int(cu[i]), int(padded[i])
            for key, value in sample.items():  # tokens, labels, loss mask, teacher fields, ...
                assert torch.equal(batch[key][0, dst : dst + n], value[src : src + n]), (row, key)
            gap = slice(dst + n, int(padded[i + 1]))
            assert int(batch["loss_mask"][0, gap].sum()) == 0 and bool(
                (batch["segment_ids"][0, gap] == -1).all()
            )


def _partition_reference(padded: list[int], cp: int, rank: int) -> list[int]:
    out = []
    for a, b in itertools.pairwise(padded):
        chunk = (b - a) // (2 * cp)
        out += list(range(a + rank * chunk, a + (rank + 1) * chunk))
        out += list(range(a + (2 * cp - 1 - rank) * chunk, a + (2 * cp - rank) * chunk))
    return out


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_cp_partition_gives_every_position_to_one_rank(cp: int) -> None:
    padded = torch.tensor([0, 8, 24, 32, 64], dtype=torch.int32)
    parts = [cp_partition_index(padded, cp, r) for r in range(cp)]
    for r, part in enumerate(parts):
        assert part.tolist() == _partition_reference(padded.tolist(), cp, r)
        assert len(part) == 64 // cp
    assert sorted(torch.cat(parts).tolist()) == list(range(64))
    with pytest.raises(ValueError, match="multiples of 2"):
        cp_partition_index(torch.tensor([0, 6, 16], dtype=torch.int32), 2, 0)


def test_row_multiples_for_sequence_parallel_and_fp8() -> None:
    assert row_multiple(1, 8, True) == (1, 8)
    assert row_multiple(2, 4, True) == (4, 8)  # lcm(2·CP, CP·TP)
    assert row_multiple(1, 2, False, fp8=True) == (1, 16)
    assert row_multiple(2, 2, True, fp8=True) == (4, 64)  # 16 tokens per rank after CP and SP


def test_thd_takes_one_row_per_micro_batch(store: PackedStore) -> None:
    with pytest.raises(ValueError, match="micro_batch_size=1"):
        collate_thd([store[0], store[1]], 1, store.seq_length)
    with pytest.raises(ValueError, match="more than"):
        pad_row(store[0], 64, store.seq_length)  # each run padded to 64 cannot fit a 64-token row


def test_the_store_data_module_serves_thd_rows_at_the_padded_length(store: PackedStore) -> None:
    """What `nemo-dcod train` builds for Transformer Engine on a packed store under CP=2."""
    from nemo_dcod.data.module import StoreTraceDataModule

    doc_multiple, row_mult = row_multiple(2)
    length = store_row_length(store.path, store.seq_length, doc_multiple, row_mult)
    module = StoreTraceDataModule(
        path=str(store.path),
        seq_length=store.seq_length,
        micro_batch_size=1,
        global_batch_size=4,
        num_train_samples=8,
        attention="thd",
        doc_multiple=doc_multiple,
        row_length=length,
    )
    assert module.data_sampler.seq_len == length > store.seq_length  # the pipeline's buffers
    batches = [module.collate_fn([module.train_ds[i]]) for i in range(8)]
    for batch in batches:
        assert batch["tokens"].shape == (1, length) and "attention_mask" not in batch
        assert int(batch["cu_seqlens_padded"][0, -1]) == length
    dense = StoreTraceDataModule(str(store.path), store.seq_length, 2, 4, 8)
    assert dense.collate_fn([dense.train_ds[0], dense.train_ds[1]])["attention_mask"].shape == (2, 1, 64, 64)
