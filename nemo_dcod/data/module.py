"""Lightning data modules that feed NeMo's Megatron training loop, for each batch source.

:class:`MegatronSampledDataModule` holds what every source shares: NeMo's ``MegatronDataSampler``
(micro/global batch sizes, each global batch split over the data-parallel ranks in a fixed order)
and the resumable position (``consumed_samples`` in the checkpoint, restored before the train
dataloader is made), as NeMo's own pre-training data module does. Subclasses only set
``train_ds`` / ``val_ds`` (and a collate function); their constructors take plain values, because
NeMo records a data module in a checkpoint's context by its arguments.

:class:`StoreTraceDataModule` reads the packed store made by ``nemo-dcod prepare``. Training samples
are the store's training rows, epoch after epoch, as many as ``max_steps x global_batch_size``
needs (Megatron's sampler does not start new epochs: :class:`EpochRows` maps its global sample index
to an epoch and a position in it). With ``shuffle`` (the default) each epoch serves the rows in a
permutation of its own, drawn from ``(seed, epoch)``: as Megatron's ``GPTDataset`` and NeMo's packed
SFT dataset do, and needed here because ``prepare``'s best-fit packing writes the longest documents
first, so store order is a length curriculum whose global batches are far from i.i.d. The order is a
pure function of the sample index, so every TP / PP / DP / vPP layout sees the same global batches
(Megatron's sampler gives each data-parallel rank its fixed slice of each) and a resume from
``consumed_samples`` continues the same permutation mid-epoch. ``num_val_samples`` rows are held out
for validation (a seeded random subset with ``shuffle``, the store's last rows without), served in a
fixed order. How batches keep packed documents apart depends on the attention that runs
(:data:`ATTENTION_FORMS`): the ``[B, 1, S, S]`` block-diagonal causal mask for megatron-core's
local attention (its unfused softmax applies it), Transformer Engine's THD boundaries
(:mod:`nemo_dcod.data.thd`, one row per micro-batch), or nothing but causality when every row
holds one document.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from nemo.lightning import io
from torch.utils.data import DataLoader, Dataset

__all__ = ["ATTENTION_FORMS", "EpochRows", "MegatronSampledDataModule", "StoreTraceDataModule", "split_rows"]

ATTENTION_FORMS = ("dense_mask", "thd", "causal")
"""How a store batch carries document boundaries: a dense block-diagonal mask (local attention),
THD metadata (Transformer Engine), or none (one document per row: the causal mask is enough)."""


class MegatronSampledDataModule(pl.LightningDataModule):
    """Shared base: Megatron's sampler, NeMo's batch-size attributes, the checkpointed position.

    Args:
        seq_length: tokens per sample; micro_batch_size / global_batch_size: as in the trainer.
    """

    train_ds: Dataset[dict[str, torch.Tensor]]
    val_ds: Dataset[dict[str, torch.Tensor]]
    collate_fn: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]] | None = None

    def __init__(self, seq_length: int, micro_batch_size: int, global_batch_size: int) -> None:
        from nemo.lightning.pytorch.plugins import MegatronDataSampler

        super().__init__()
        self.data_sampler = MegatronDataSampler(
            seq_len=seq_length, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size
        )
        self.init_global_step = 0
        # Read by NeMo (llm.train's telemetry config, the strategy's batch-size checks).
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size

    def _loader(self, dataset: Dataset[dict[str, torch.Tensor]], mode: str) -> DataLoader[Any]:
        """A loader tagged with its ``mode`` (NeMo's ``WrappedDataLoader``): NeMo's sampler starts only
        ``train`` loaders at the resumed consumed-samples count; an untagged loader counts as train,
        so a resumed run's validation sampler started past its few samples (an extended run failed
        with "no samples left to consume: 320, 16"; a shorter offset would have skipped some)."""
        from nemo.lightning.data import WrappedDataLoader

        return WrappedDataLoader(mode=mode, dataset=dataset, num_workers=0, collate_fn=self.collate_fn)

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        """Samples in index order; the Megatron sampler batches and shards them.

        Called after a checkpoint is restored: the step it resumes at is where the consumed-samples
        count restarts from (as in NeMo's pre-training data module).
        """
        assert self.trainer is not None  # Lightning attaches it before asking for dataloaders
        self.init_global_step = self.trainer.global_step
        self.data_sampler.init_global_step = self.init_global_step
        return self._loader(self.train_ds, "train")

    def val_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        """The validation samples, from the first every time (also after a resume)."""
        return self._loader(self.val_ds, "validation")

    def reconfigure_limit_batches(self) -> None:
        """Count ``limit_val_batches`` in global batches: Lightning counts micro-batches here (NeMo
        calls this hook; its own data modules do the same)."""
        from nemo.collections.llm.gpt.data.utils import _reconfigure_limit_batches

        assert self.trainer is not None
        self.trainer.limit_val_batches = _reconfigure_limit_batches(
            self.trainer.limit_val_batches, self.val_ds
        )

    def state_dict(self) -> dict[str, Any]:
        """The number of samples consumed so far, saved in the checkpoint."""
        assert self.trainer is not None
        steps = self.trainer.global_step - self.init_global_step
        return {"consumed_samples": self.data_sampler.compute_consumed_samples(steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the sampler at the checkpoint's consumed-samples count."""
        from megatron.core.num_microbatches_calculator import update_num_microbatches

        consumed = int(state_dict["consumed_samples"])
        self.data_sampler.init_consumed_samples = consumed
        self.data_sampler.prev_consumed_samples = consumed
        update_num_microbatches(consumed_samples=consumed, consistency_check=False)
        self.data_sampler.if_first_step = 1


class EpochRows(Dataset[dict[str, torch.Tensor]]):
    """``rows`` of ``base``, epoch after epoch, up to ``length`` samples.

    Sample ``i`` is in epoch ``e = i // len(rows)`` at position ``i % len(rows)``. With
    ``shuffle_seed`` each epoch's order is its own permutation of ``rows``, drawn from
    ``(shuffle_seed, e)`` alone (numpy's PCG64 through ``SeedSequence``): the same for every process
    and layout, and any sample's row is known without replaying earlier epochs, so a resume at any
    ``consumed_samples`` continues exactly. None: ``rows`` in their order every epoch.
    """

    def __init__(
        self,
        base: Dataset[dict[str, torch.Tensor]],
        rows: Sequence[int],
        length: int,
        shuffle_seed: int | None,
    ) -> None:
        if len(rows) == 0:
            raise ValueError("the store has no rows left for this split (lower data.num_val_samples).")
        self.base, self.rows, self.length, self.shuffle_seed = base, list(rows), length, shuffle_seed
        self._epoch, self._order = -1, self.rows

    def __len__(self) -> int:
        return self.length

    def row(self, index: int) -> int:
        """The store row that sample ``index`` serves."""
        epoch, position = divmod(int(index), len(self.rows))
        if self.shuffle_seed is None:
            return self.rows[position]
        if epoch != self._epoch:  # one permutation held: the sampler reads indices in order
            rng = np.random.default_rng([self.shuffle_seed, epoch])
            self._epoch, self._order = epoch, [self.rows[i] for i in rng.permutation(len(self.rows))]
        return self._order[position]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.base[self.row(index)]


def split_rows(num_rows: int, num_val: int, shuffle_seed: int | None) -> tuple[list[int], list[int]]:
    """``(train_rows, val_rows)`` of a store of ``num_rows`` rows, ``num_val`` of them held out.

    With ``shuffle_seed`` the held-out rows are a random subset drawn from it (the store's tail holds
    its shortest documents under best-fit packing, so the last rows would be a biased validation
    set); without, the last rows. Both lists are in store order. At least one row stays for training.
    """
    held_out = min(num_val, num_rows - 1)
    if held_out <= 0:
        return list(range(num_rows)), []
    if shuffle_seed is None:
        val = list(range(num_rows - held_out, num_rows))
    else:
        # A stream of its own (the trailing 1), apart from the epochs' permutations.
        picked = np.random.default_rng([shuffle_seed, 0, 1]).permutation(num_rows)[:held_out]
        val = sorted(int(i) for i in picked)
    chosen = set(val)
    return [i for i in range(num_rows) if i not in chosen], val


class StoreTraceDataModule(MegatronSampledDataModule, io.IOMixin):
    """Batches from the packed store at ``path`` (see the module docstring).

    Args:
        path: the store directory (``out_dir`` of ``nemo-dcod prepare``).
        seq_length, micro_batch_size, global_batch_size: must match the store / the trainer.
        num_train_samples: training samples to serve (max_steps x global_batch_size).
        num_val_samples: rows held out for validation (0: none; see :func:`split_rows`).
        attention: one of :data:`ATTENTION_FORMS`.
        doc_multiple, row_length: THD only (:func:`~nemo_dcod.data.thd.pad_row`): each document
            padded to a multiple of ``doc_multiple`` positions, rows to ``row_length`` tokens (the
            pipeline's sequence length); None: the store's.
        shuffle_seed: each epoch's permutation of the training rows and the held-out subset are
            drawn from it (:class:`EpochRows`); None: store order, the last rows held out.
    """

    def __init__(
        self,
        path: str,
        seq_length: int,
        micro_batch_size: int,
        global_batch_size: int,
        num_train_samples: int,
        num_val_samples: int = 0,
        attention: str = "dense_mask",
        doc_multiple: int = 1,
        row_length: int | None = None,
        shuffle_seed: int | None = None,
    ) -> None:
        from nemo_dcod.data.store import PackedStore, collate_packed
        from nemo_dcod.data.thd import collate_thd

        if attention not in ATTENTION_FORMS:
            raise ValueError(f"attention={attention!r}: one of {', '.join(ATTENTION_FORMS)}.")
        length = row_length or seq_length
        super().__init__(length if attention == "thd" else seq_length, micro_batch_size, global_batch_size)
        store = PackedStore(path)
        if store.seq_length != seq_length:
            raise ValueError(f"{path}: rows of {store.seq_length} tokens, data.seq_length={seq_length}.")
        train_rows, val_rows = split_rows(len(store), num_val_samples, shuffle_seed)
        self.train_ds = EpochRows(store, train_rows, num_train_samples, shuffle_seed)
        # Whole global batches (the sampler drops a partial one): repeat the held-out rows as needed,
        # always in one fixed order.
        val_length = -(-max(num_val_samples, 1) // global_batch_size) * global_batch_size
        self.val_ds = EpochRows(store, val_rows or train_rows, val_length, None)
        if attention == "thd":
            self.collate_fn = functools.partial(collate_thd, doc_multiple=doc_multiple, row_length=length)
        else:
            self.collate_fn = functools.partial(collate_packed, attention_mask=attention == "dense_mask")
