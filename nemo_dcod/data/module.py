"""Lightning data modules that feed NeMo's Megatron training loop, for each batch source.

:class:`MegatronSampledDataModule` holds what every source shares: NeMo's ``MegatronDataSampler``
(micro/global batch sizes, each global batch split over the data-parallel ranks in a fixed order)
and the resumable position (``consumed_samples`` in the checkpoint, restored before the train
dataloader is made), as NeMo's own pre-training data module does. Subclasses only set
``train_ds`` / ``val_ds`` (and a collate function); their constructors take plain values, because
NeMo records a data module in a checkpoint's context by its arguments.

:class:`StoreTraceDataModule` reads the packed store made by ``nemo-dcod prepare``. Training samples
are the store's rows repeated in order as many times as ``max_steps x global_batch_size`` needs
(Megatron's sampler does not start new epochs); the last ``num_val_samples`` rows are held out for
validation. How batches keep packed documents apart depends on the attention that runs
(:data:`ATTENTION_FORMS`): the ``[B, 1, S, S]`` block-diagonal causal mask for megatron-core's
local attention (its unfused softmax applies it), Transformer Engine's THD boundaries
(:mod:`nemo_dcod.data.thd`, one row per micro-batch), or nothing but causality when every row
holds one document.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from nemo.lightning import io
from torch.utils.data import DataLoader, Dataset

__all__ = ["ATTENTION_FORMS", "MegatronSampledDataModule", "RepeatedRows", "StoreTraceDataModule"]

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

    def _loader(self, dataset: Dataset[dict[str, torch.Tensor]]) -> DataLoader[dict[str, torch.Tensor]]:
        return DataLoader(dataset, num_workers=0, collate_fn=self.collate_fn)

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        """Samples in index order; the Megatron sampler batches and shards them.

        Called after a checkpoint is restored: the step it resumes at is where the consumed-samples
        count restarts from (as in NeMo's pre-training data module).
        """
        assert self.trainer is not None  # Lightning attaches it before asking for dataloaders
        self.init_global_step = self.trainer.global_step
        self.data_sampler.init_global_step = self.init_global_step
        return self._loader(self.train_ds)

    def val_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        """The validation samples."""
        return self._loader(self.val_ds)

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


class RepeatedRows(Dataset[dict[str, torch.Tensor]]):
    """``rows`` of ``base`` (a range of it), repeated in order up to ``length`` samples."""

    def __init__(self, base: Dataset[dict[str, torch.Tensor]], rows: range, length: int) -> None:
        if len(rows) == 0:
            raise ValueError("the store has no rows left for this split (lower data.num_val_samples).")
        self.base, self.rows, self.length = base, rows, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.base[self.rows[int(index) % len(self.rows)]]


class StoreTraceDataModule(MegatronSampledDataModule, io.IOMixin):
    """Batches from the packed store at ``path`` (see the module docstring).

    Args:
        path: the store directory (``out_dir`` of ``nemo-dcod prepare``).
        seq_length, micro_batch_size, global_batch_size: must match the store / the trainer.
        num_train_samples: training samples to serve (max_steps x global_batch_size).
        num_val_samples: rows held out from the end of the store for validation (0: none).
        attention: one of :data:`ATTENTION_FORMS`.
        doc_multiple, row_length: THD only (:func:`~nemo_dcod.data.thd.pad_row`): each document
            padded to a multiple of ``doc_multiple`` positions, rows to ``row_length`` tokens (the
            pipeline's sequence length); None: the store's.
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
        held_out = min(num_val_samples, len(store) - 1)
        train_rows = range(0, len(store) - held_out)
        val_rows = range(len(store) - held_out, len(store)) if held_out else train_rows
        self.train_ds = RepeatedRows(store, train_rows, num_train_samples)
        # Whole global batches (the sampler drops a partial one): repeat the held-out rows as needed.
        val_length = -(-max(num_val_samples, 1) // global_batch_size) * global_batch_size
        self.val_ds = RepeatedRows(store, val_rows, val_length)
        if attention == "thd":
            self.collate_fn = functools.partial(collate_thd, doc_multiple=doc_multiple, row_length=length)
        else:
            self.collate_fn = functools.partial(collate_packed, attention_mask=attention == "dense_mask")
