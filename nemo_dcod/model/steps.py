"""The data and forward steps of the plug-in: teacher signals to the last stage, logits to the loss.

NeMo's stock ``gpt_data_step`` keeps only ``labels`` and ``loss_mask`` for the last pipeline stage
and ``gpt_forward_step`` passes ``labels`` to the model, so the model returns per-token
cross-entropy and the teacher fields never reach the loss. Here:

* :func:`trace_data_step` moves to the device what each pipeline stage needs: the first stage the
  inputs (``tokens``, ``position_ids``), the last stage the label and the teacher-signal fields
  (:data:`LAST_STAGE_KEYS`); every other key becomes ``None`` (so a middle stage moves nothing).
  Context parallelism then slices every ``[B, S, ...]`` field along the sequence, like NeMo does.
* :func:`logits_forward_step` calls the model *without* labels: on the last stage Megatron's
  ``GPTModel`` then returns the vocab-parallel logits ``[B, S, V/TP]`` (batch-first), which the
  loss reduction turns into log-probs with the ops in :mod:`nemo_dcod.parallel`.

**Packed rows, two forms** (chosen by the data module, see :mod:`nemo_dcod.data.module`):

* a dense ``attention_mask`` ``[B, 1, S, S]`` (block-diagonal causal), for megatron-core's local
  attention, whose unfused softmax applies it;
* THD metadata (``cu_seqlens``, optional ``cu_seqlens_padded``, ``max_seqlen``; see
  :mod:`nemo_dcod.data.thd`) for Transformer Engine: every stage needs it (each layer's attention
  reads the boundaries), the forward step turns it into megatron-core's ``PackedSeqParams`` and
  passes no mask, and context parallelism takes each document's balanced chunks
  (:func:`~nemo_dcod.data.thd.cp_partition_index`) instead of slicing the row into ``2·CP``
  pieces (NeMo's ``get_batch_on_this_cp_rank``, right only for one sequence per row).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = [
    "FIRST_STAGE_KEYS",
    "LAST_STAGE_KEYS",
    "logits_forward_step",
    "packed_seq_params",
    "trace_data_step",
]

FIRST_STAGE_KEYS = ("tokens", "position_ids")
"""What the embedding (first pipeline stage) reads."""

LAST_STAGE_KEYS = (
    "labels",
    "loss_mask",
    "segment_ids",
    "teacher_logprobs",
    "teacher_topk_ids",
    "teacher_topk_logprobs",
)
"""What the loss (last pipeline stage) reads: the label and the stored teacher signals."""

ALL_STAGE_KEYS = ("attention_mask", "cu_seqlens", "cu_seqlens_padded")
"""What every stage's attention reads: the dense mask, or the THD boundaries."""

HOST_KEYS = ("max_seqlen",)
"""Read on the host (a Python int for Transformer Engine), never moved to the device."""

_NOT_SEQUENCE = (*ALL_STAGE_KEYS, *HOST_KEYS)


def _unwrap(batch: Any) -> dict[str, Any]:
    # Lightning's fetcher may hand (batch, batch_idx, dataloader_idx).
    if isinstance(batch, tuple) and len(batch) == 3:
        batch = batch[0]
    if not isinstance(batch, dict):
        raise TypeError(f"trace_data_step: expected a dict batch, got {type(batch).__name__}.")
    return batch


def trace_data_step(dataloader_iter: Iterator[Any]) -> dict[str, torch.Tensor | None]:
    """Next micro-batch, with the fields this pipeline stage needs on its device.

    Args:
        dataloader_iter: yields dict batches of ``[B, S]`` (and ``[B, S, K]``) tensors.

    Returns:
        The batch with the needed keys moved to the device and the others set to ``None``,
        sliced along the sequence for this context-parallel rank.
    """
    from megatron.core import parallel_state
    from nemo.collections.llm.gpt.model.base import get_batch_on_this_cp_rank

    batch = _unwrap(next(dataloader_iter))
    needed = set(ALL_STAGE_KEYS)
    if parallel_state.is_pipeline_first_stage():
        needed.update(FIRST_STAGE_KEYS)
    if parallel_state.is_pipeline_last_stage():
        needed.update(LAST_STAGE_KEYS)
    out: dict[str, torch.Tensor | None] = {}
    for key, value in batch.items():
        if key in HOST_KEYS and isinstance(value, torch.Tensor):
            out[key] = value.cpu()
        elif key in needed and isinstance(value, torch.Tensor):
            out[key] = value.cuda(non_blocking=True)
        else:
            out[key] = None
    if out.get("cu_seqlens") is None:
        result: dict[str, torch.Tensor | None] = get_batch_on_this_cp_rank(out)
        return result
    return _thd_on_this_cp_rank(out)


def _thd_on_this_cp_rank(batch: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """This context-parallel rank's positions of every ``[1, T, ...]`` field of a THD row."""
    from megatron.core import parallel_state

    from nemo_dcod.data.thd import cp_partition_index

    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return batch
    padded = batch.get("cu_seqlens_padded")
    assert padded is not None, "the THD collate adds cu_seqlens_padded whenever CP > 1"
    index = cp_partition_index(padded[0], cp, parallel_state.get_context_parallel_rank())
    return {
        k: v.index_select(1, index) if v is not None and k not in _NOT_SEQUENCE else v
        for k, v in batch.items()
    }


def packed_seq_params(batch: Mapping[str, torch.Tensor | None]) -> Any:
    """megatron-core's ``PackedSeqParams`` (THD) of a micro-batch, or None for a dense batch.

    ``cu_seqlens`` are the real run lengths; ``cu_seqlens_padded``, when the layout has padding
    (context parallelism), where each run sits. ``max_seqlen`` bounds every (padded) run.
    """
    cu = batch.get("cu_seqlens")
    if cu is None:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    padded = batch.get("cu_seqlens_padded")
    host_max = batch.get("max_seqlen")
    longest = int(host_max.reshape(-1)[0]) if host_max is not None else None
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu[0],
        cu_seqlens_kv=cu[0],
        cu_seqlens_q_padded=None if padded is None else padded[0],
        cu_seqlens_kv_padded=None if padded is None else padded[0],
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )


def logits_forward_step(model: Any, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Run the model without labels: the last stage returns logits ``[B, S, V/TP]``.

    A THD micro-batch goes in with its ``PackedSeqParams`` and no mask (``B = 1``).

    Args:
        model: the NeMo ``GPTModel`` (its ``forward`` calls Megatron's ``GPTModel``).
        batch: from :func:`trace_data_step`.
    """
    params = packed_seq_params(batch)
    extra = {} if params is None else {"packed_seq_params": params}
    output: torch.Tensor = model(
        input_ids=batch.get("tokens"),
        position_ids=batch.get("position_ids"),
        attention_mask=None if params is not None else batch.get("attention_mask"),
        labels=None,
        **extra,
    )
    return output
