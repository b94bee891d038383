"""The order in which ``nemo-dcod train`` serves a packed store's rows (``data.shuffle``).

A store made by the real ``prepare`` with best-fit packing holds its longest documents in its first
rows. Served in store order, every epoch would run from the longest documents to the shortest;
shuffled, the first global batches look like the store as a whole. Each check here reads the data
module that ``train`` builds (:class:`nemo_dcod.data.module.StoreTraceDataModule`), and the first
one also shows that store order fails it. The layouts' agreement on global batches and the exact
resume are checked on real runs (``tests/distributed/test_train_layouts.py``,
``tests/distributed/test_train_resume.py``).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
from helpers.trace_fixtures import make_tokenizer, record, write_jsonl

from nemo_dcod.data.module import EpochRows, StoreTraceDataModule, split_rows
from nemo_dcod.data.store import PackedStore

SEQ, GLOBAL_BATCH = 64, 8


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> PackedStore:
    """240 traces, a third long (38-47 words) and two thirds short (3-8 words), as the styles
    task's stepwise and shortcut traces, packed best-fit into 64-token rows: the long documents,
    each with a short one, fill the first rows; the remaining short ones, several per row, the last."""
    from nemo_dcod.data.config import PrepareConfig
    from nemo_dcod.data.prepare import run_prepare

    root = tmp_path_factory.mktemp("order")
    traces = write_jsonl(
        root / "traces.jsonl",
        [record(i, words=38 + i % 10 if i % 3 == 0 else 3 + i % 6, teacher=True) for i in range(240)],
    )
    cfg = PrepareConfig(
        inputs=[str(traces)],
        tokenizer=make_tokenizer(root / "tok", vocab_size=128),
        out_dir=str(root / "store"),
        seq_length=SEQ,
        packing="best_fit",
    )
    cfg.fields.teacher_tokens, cfg.fields.teacher_logprobs = "ids", "lps"
    run_prepare(cfg, quiet=True)
    return PackedStore(cfg.out_dir)


def _module(store: PackedStore, seed: int | None, steps: int = 40, num_val: int = 0) -> StoreTraceDataModule:
    return StoreTraceDataModule(
        path=str(store.path),
        seq_length=SEQ,
        micro_batch_size=2,
        global_batch_size=GLOBAL_BATCH,
        num_train_samples=steps * GLOBAL_BATCH,
        num_val_samples=num_val,
        shuffle_seed=seed,
    )


def _document_lengths(store: PackedStore, row: int) -> list[int]:
    """Tokens of each document packed in ``row`` (padding, segment -1, excluded)."""
    segments = store[row]["segment_ids"].tolist()
    return [segments.count(doc) for doc in sorted(set(segments) - {-1})]


def _first_batches_mean(store: PackedStore, rows: EpochRows, batches: int) -> float:
    served = [rows.row(i) for i in range(batches * GLOBAL_BATCH)]
    return statistics.fmean(n for row in served for n in _document_lengths(store, row))


def test_first_global_batches_look_like_the_store(store: PackedStore) -> None:
    """The first 3 global batches' mean document length is the store's within 3 standard errors
    (seeds 1-5); in store order it is the longest documents' mean, far outside."""
    lengths = [n for row in range(len(store)) for n in _document_lengths(store, row)]
    mean, spread = statistics.fmean(lengths), statistics.pstdev(lengths)
    assert len(store) >= 6 * GLOBAL_BATCH, len(store)  # several global batches per epoch
    for seed in range(1, 6):
        rows = _module(store, seed).train_ds
        assert isinstance(rows, EpochRows)
        served_docs = sum(len(_document_lengths(store, rows.row(i))) for i in range(3 * GLOBAL_BATCH))
        tolerance = 3 * spread / math.sqrt(served_docs)
        got = _first_batches_mean(store, rows, 3)
        assert abs(got - mean) <= tolerance, (seed, got, mean, tolerance)
    ordered = _module(store, None).train_ds
    assert isinstance(ordered, EpochRows)
    in_store_order = _first_batches_mean(store, ordered, 3)
    assert in_store_order > mean + 3 * tolerance, (in_store_order, mean)  # what shuffling fixes


def test_each_epoch_serves_every_training_row_once_in_its_own_order(store: PackedStore) -> None:
    module = _module(store, 1234, num_val=10)
    rows = module.train_ds
    assert isinstance(rows, EpochRows)
    n = len(rows.rows)
    epochs = [[rows.row(e * n + i) for i in range(n)] for e in range(4)]
    for order in epochs:
        assert sorted(order) == sorted(rows.rows)
    assert len({tuple(order) for order in epochs}) == 4  # a new permutation each epoch
    assert epochs[0] != sorted(rows.rows)
    # A fresh module (another rank, another layout, a resumed run) serves the same rows at any
    # sample index, without having read the earlier ones.
    again = _module(store, 1234, num_val=10).train_ds
    assert isinstance(again, EpochRows)
    for index in (3 * n + 5, 17, 2 * n - 1, 0):
        assert again.row(index) == rows.row(index)
        assert again[index]["tokens"].equal(store[rows.row(index)]["tokens"])
    other = _module(store, 99, num_val=10).train_ds
    assert isinstance(other, EpochRows)
    assert [other.row(i) for i in range(n)] != epochs[0]  # the seed chooses the order


def test_validation_rows_are_held_out_in_a_fixed_order(store: PackedStore) -> None:
    module = _module(store, 7, num_val=10)
    train, val = module.train_ds, module.val_ds
    assert isinstance(train, EpochRows) and isinstance(val, EpochRows)
    assert val.shuffle_seed is None and len(val.rows) == 10
    assert not set(val.rows) & set(train.rows) and len(val.rows) + len(train.rows) == len(store)
    # A random subset, not the store's tail (its shortest documents under best-fit packing).
    assert val.rows != list(range(len(store) - 10, len(store)))
    assert [val.row(i) for i in range(len(val))] == [val.rows[i % 10] for i in range(len(val))]
    assert _module(store, 7, num_val=10).val_ds.rows == val.rows  # type: ignore[attr-defined]
    # Without shuffling: store order and the last rows, as before data.shuffle existed.
    assert split_rows(20, 3, None) == (list(range(17)), [17, 18, 19])
    assert split_rows(5, 9, 1)[0] != [] and len(split_rows(5, 9, 1)[1]) == 4  # one row stays


def test_no_rows_left_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rows left"):
        EpochRows([], [], 8, 1)  # type: ignore[arg-type]
