"""Packed rows in Transformer Engine's THD layout: document boundaries -> ``PackedSeqParams``.

A packed store row holds documents back to back, then a run of padding (``segment_ids`` -1).
Megatron's local attention keeps documents apart with a dense ``[S, S]`` block-diagonal mask;
Transformer Engine's fused/flash attention takes the boundaries instead, as cumulative sequence
lengths (``cu_seqlens``) over the ``[T]`` tokens of a micro-batch ("THD": tokens x heads x dim,
the batch dimension folded away; megatron-core's ``PackedSeqParams(qkv_format="thd")``). This
module computes them, and the layout changes context parallelism needs, as pure tensor functions:

* **Runs.** Each document, and the trailing padding run, is one sequence of the pack (a padding
  run attends only to itself and is never trained). Rows never share a sequence.
* **Context parallelism** (CP > 1) splits every sequence into ``2·CP`` equal chunks and gives rank
  ``r`` chunks ``r`` and ``2·CP-1-r`` (the load-balanced causal split; Transformer Engine's
  ``thd_get_partitioned_indices``). So each sequence must occupy a multiple of ``2·CP`` positions:
  :func:`pad_row` moves each run to an offset that is such a multiple, leaving padding positions
  after it. TE then reads the real lengths from ``cu_seqlens`` and the layout from
  ``cu_seqlens_padded``; RoPE positions restart at each padded offset (megatron-core's
  ``_apply_rotary_pos_emb_thd``), i.e. at each document's first token.
* **Row length.** After padding, a row is longer than the store's ``seq_length``; every row of a
  run is brought to one fixed length (:func:`padded_row_length`, the longest padded row of the
  store, rounded up to what sequence parallelism and FP8 need), because the pipeline schedule
  sizes its send/receive buffers once.

Nothing here knows about Megatron's global state: sizes come in as arguments. Teacher fields,
labels and loss mask move with their tokens (every ``[B, S, ...]`` field goes through the same
index), so the loss stays aligned.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "THD_KEYS",
    "collate_thd",
    "cp_partition_index",
    "pad_row",
    "padded_length",
    "padded_row_length",
    "row_multiple",
    "run_lengths",
    "store_row_length",
]

THD_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen")
"""Batch keys of the THD metadata: ``[N + 1]`` int32 each, and ``[1]`` int64 (host)."""

# What a padding position holds in each field (never attended by a real token, never trained).
_FILL = {"segment_ids": -1}


def row_multiple(
    context_parallel_size: int = 1,
    tensor_model_parallel_size: int = 1,
    sequence_parallel: bool = False,
    fp8: bool = False,
) -> tuple[int, int]:
    """``(document multiple, row multiple)``: what each sequence's and each row's length must be
    a multiple of.

    * CP > 1: every sequence a multiple of ``2·CP`` (the balanced split into ``2·CP`` chunks).
    * Rows: a multiple of ``2·CP``; with sequence parallelism each CP rank's ``T/CP`` tokens are
      split again over TP, so ``T`` must divide by ``CP·TP`` too; FP8 GEMMs want the tokens of a
      rank (``T / CP / (TP if SP)``) to be a multiple of 16.
    """
    cp, tp = context_parallel_size, tensor_model_parallel_size
    doc = 2 * cp if cp > 1 else 1
    per_rank = cp * (tp if sequence_parallel else 1)
    row = math.lcm(doc, per_rank)
    if fp8:
        row = math.lcm(row, 16 * per_rank)
    return doc, row


def run_lengths(segment_ids: Tensor) -> Tensor:
    """Lengths of the runs of equal ``segment_ids`` in one row, in order: ``[N]`` int64.

    Args:
        segment_ids: ``[S]`` document number per position (-1 on padding).
    """
    s = segment_ids.shape[-1]
    starts = torch.ones(s, dtype=torch.bool, device=segment_ids.device)
    starts[1:] = segment_ids[1:] != segment_ids[:-1]
    positions = torch.nonzero(starts)[:, 0]
    return torch.diff(positions, append=torch.tensor([s], device=segment_ids.device))


def _round_up(n: Any, multiple: int) -> Any:
    """``n`` (an int, array or tensor) rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def padded_length(segment_ids: Tensor, doc_multiple: int, row_multiple_: int = 1) -> int:
    """Positions one row takes in the THD layout: each run padded to ``doc_multiple``, the total
    rounded up to ``row_multiple_``.

    Args:
        segment_ids: ``[S]`` document number per position (-1 on padding).
    """
    total = int(_round_up(run_lengths(segment_ids), doc_multiple).sum())
    return int(_round_up(total, row_multiple_))


def padded_row_length(
    documents: Sequence[np.ndarray], seq_length: int, doc_multiple: int, row_multiple_: int
) -> int:
    """The fixed row length after :func:`pad_row`, over every row of a store.

    Args:
        documents: each shard's ``documents.npy``: ``[D, 4]`` (row, start, length, record).
        seq_length: the store's row length.
        doc_multiple, row_multiple_: from :func:`row_multiple`.
    """
    longest = seq_length
    if doc_multiple > 1:
        for docs in documents:
            if len(docs) == 0:
                continue
            rows, lengths = docs[:, 0].astype(np.int64), docs[:, 2].astype(np.int64)
            padded = np.bincount(rows, weights=_round_up(lengths, doc_multiple)).astype(np.int64)
            used = np.bincount(rows, weights=lengths).astype(np.int64)
            tail = _round_up(seq_length - used, doc_multiple)  # the padding run (0 when full)
            longest = max(longest, int((padded + tail).max()))
    return int(_round_up(longest, row_multiple_))


def store_row_length(path: str | Path, seq_length: int, doc_multiple: int, row_multiple_: int) -> int:
    """:func:`padded_row_length` of the store at ``path`` (reads each shard's ``documents.npy``)."""
    import json

    manifest = json.loads((Path(path) / "manifest.json").read_text())
    documents = []
    if doc_multiple > 1:
        for shard in manifest["shards"]:
            documents.append(np.load(Path(path) / "shards" / shard["name"] / "documents.npy"))
    return padded_row_length(documents, seq_length, doc_multiple, row_multiple_)


def pad_row(
    sample: Mapping[str, Tensor], doc_multiple: int, row_length: int
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """One row in the THD layout: every run at an offset that is a multiple of ``doc_multiple``.

    Args:
        sample: ``[S]`` / ``[S, K]`` fields of one row (``segment_ids`` among them).
        doc_multiple: each run's padded length is a multiple of it (1: no padding).
        row_length: the length of the returned row (>= the padded runs; the rest is added to the
            last run's padding).

    Returns:
        ``(fields [row_length, ...], cu_seqlens [N + 1], cu_seqlens_padded [N + 1])``, int32
        boundaries: real run lengths, and their padded offsets.

    Raises:
        ValueError: the padded runs do not fit in ``row_length``.
    """
    seg = sample["segment_ids"]
    lengths = run_lengths(seg)
    padded = _round_up(lengths, doc_multiple)
    total = int(padded.sum())
    if total > row_length:
        raise ValueError(f"pad_row: the row's runs take {total} positions padded, more than {row_length}.")
    padded[-1] += row_length - total
    zero = torch.zeros(1, dtype=torch.int64, device=seg.device)
    cu = torch.cat([zero, lengths.cumsum(0)]).to(torch.int32)
    cu_padded = torch.cat([zero, padded.cumsum(0)]).to(torch.int32)
    if doc_multiple == 1 and row_length == seg.shape[0]:
        return dict(sample), cu, cu_padded
    # Source position of each target position (-1: padding), built run by run without a loop:
    # target t in run i reads source (start_i + t - offset_i) while t - offset_i < length_i.
    run_of = torch.repeat_interleave(torch.arange(len(lengths), device=seg.device), padded)
    within = torch.arange(row_length, device=seg.device) - cu_padded[:-1].long()[run_of]
    source = torch.where(within < lengths[run_of], cu[:-1].long()[run_of] + within, -1)
    real = source >= 0
    gather = source.clamp(min=0)
    out = {}
    for key, value in sample.items():
        moved = value[gather]
        fill = torch.full((), _FILL.get(key, 0), dtype=value.dtype, device=value.device)
        mask = real.view(-1, *([1] * (value.dim() - 1)))
        out[key] = torch.where(mask, moved, fill)
    return out, cu, cu_padded


def collate_thd(
    samples: Sequence[Mapping[str, Tensor]], doc_multiple: int, row_length: int
) -> dict[str, Tensor]:
    """A micro-batch of one packed row in the THD layout, with its ``PackedSeqParams`` metadata.

    Transformer Engine's THD attention folds the batch dimension away, so a micro-batch is one row
    (``trainer.micro_batch_size=1``, as in NeMo's and Megatron-LM's packed sequence training);
    pack more documents per row instead. No dense attention mask is made.

    Args:
        samples: one :class:`~nemo_dcod.data.store.PackedStore` item.
        doc_multiple, row_length: see :func:`pad_row`.

    Returns:
        The ``[1, row_length]`` fields, ``cu_seqlens`` ``[1, N + 1]`` int32, ``cu_seqlens_padded``
        (the same shape; only when the layout has padding: ``doc_multiple > 1`` or a longer row),
        ``max_seqlen`` ``[1]`` int64 (the longest padded run).
    """
    if len(samples) != 1:
        raise ValueError(
            f"collate_thd: {len(samples)} rows in a micro-batch; THD packing takes one row per "
            "micro-batch (trainer.micro_batch_size=1)."
        )
    row = samples[0]
    fields, cu, cu_padded = pad_row(row, doc_multiple, row_length)
    batch = {k: v[None] for k, v in fields.items()}
    batch["cu_seqlens"] = cu[None]
    # The padded offsets only where the layout has padding inside it (CP, or rows made longer):
    # decided by the settings, not the data, so every micro-batch of a run has the same keys.
    if doc_multiple > 1 or row_length != row["segment_ids"].shape[0]:
        batch["cu_seqlens_padded"] = cu_padded[None]
    batch["max_seqlen"] = torch.diff(cu_padded).max().to(torch.int64).view(1)
    return batch


def cp_partition_index(cu_seqlens_padded: Tensor, context_parallel_size: int, rank: int) -> Tensor:
    """Positions of a THD row that context-parallel rank ``rank`` holds: ``[T / CP]`` int64.

    Each sequence ``[a, b)`` of ``cu_seqlens_padded`` is cut into ``2·CP`` chunks of ``(b - a) /
    (2·CP)``; the rank takes chunk ``rank`` and chunk ``2·CP - 1 - rank`` of every sequence, in
    sequence order (what Transformer Engine's ``thd_get_partitioned_indices`` returns, and what its
    context-parallel attention expects).

    Args:
        cu_seqlens_padded: ``[N + 1]`` padded offsets; every sequence a multiple of ``2·CP``.
        context_parallel_size: CP.
        rank: this rank's index in the context-parallel group.
    """
    cp = context_parallel_size
    starts, ends = cu_seqlens_padded[:-1].long(), cu_seqlens_padded[1:].long()
    chunk = (ends - starts) // (2 * cp)
    if bool(((ends - starts) % (2 * cp) != 0).any()):
        raise ValueError(
            f"cp_partition_index: sequence lengths {(ends - starts).tolist()} not multiples of 2·CP."
        )
    first = starts + rank * chunk
    second = starts + (2 * cp - 1 - rank) * chunk
    # Per sequence: [first, first + chunk) then [second, second + chunk).
    begins = torch.stack([first, second], dim=1).reshape(-1)
    sizes = torch.stack([chunk, chunk], dim=1).reshape(-1)
    offsets = torch.repeat_interleave(begins - torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]]), sizes)
    return offsets + torch.arange(int(sizes.sum()), device=cu_seqlens_padded.device)
