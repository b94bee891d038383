"""Which store rows a finished ``nemo-dcod train`` run read first, for tests that compare its
step-1 loss with a reference computed on the same rows.

Training serves rows in a seeded permutation per epoch (``data.shuffle``, the default): the first
global batch is not store rows ``0..B-1``. :func:`first_batch_rows` rebuilds it from the run's
resolved ``config.yaml`` with the production data order (:mod:`nemo_dcod.data.module`), and
:func:`store_rows` reads an array of those rows across the store's shards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from nemo_dcod.data.module import EpochRows, split_rows

__all__ = ["first_batch_rows", "store_rows"]


def first_batch_rows(run: Path, num_rows: int) -> list[int]:
    """The store rows of ``run``'s first global batch, in the order it served them (a row served
    twice, in a store smaller than the batch, appears twice)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    seed = cfg["seed"] if cfg["data"].get("shuffle", True) else None
    held_out = cfg["data"]["num_val_samples"] if cfg["trainer"]["val_check_interval"] else 0
    train_rows, _ = split_rows(num_rows, held_out, seed)
    batch = int(cfg["trainer"]["global_batch_size"])
    order = EpochRows([], train_rows, batch, seed)  # type: ignore[arg-type]  # rows only, no data
    return [order.row(i) for i in range(batch)]


def store_rows(store: Path, name: str, rows: list[int]) -> np.ndarray:
    """``<shard>/<name>.npy`` of the store's rows ``rows`` (shards in order, rows counted across them)."""
    shards = sorted(p for p in (store / "shards").iterdir() if p.is_dir())
    whole = np.concatenate([np.load(shard / f"{name}.npy") for shard in shards])
    return whole[rows]
