"""The scoring math: vocab-parallel logits of packed rows -> the store's teacher columns.

For a micro-batch of store rows (``[B, S]`` tokens, with the block-diagonal causal mask and the
per-document position ids that training uses), the model's last pipeline stage holds this rank's
logit shard ``[B, S, V/TP]``. From it, per position ``t`` (aligned to the label, token ``t + 1``):

* ``logprobs[t] = log p(token t+1 | tokens of its document <= t)``, through
  :func:`~nemo_dcod.parallel.vocab_parallel.vocab_parallel_logprobs` (max and sum-exp all-reduced,
  the label's logit from its owner: the vocabulary is never gathered);
* with ``topk = K``: the K most probable ids over the *real* vocabulary (padded columns ``>=
  vocab_size`` are never candidates) and their log-probs. Each rank takes its shard's K best, the
  ``K x TP`` candidates are all-gathered (not the vocabulary), and the global K best are kept,
  ordered by decreasing log-prob, ties by increasing id (one ``topk`` over int64 keys that pack
  the float32 logit and the id), so every layout picks the same ids.
  Their log-probs come from the same single pass over the shard as the label's.

Positions whose label is not a token of the same document (each document's last position and the
padding) hold 0 and id 0: they are never trained (loss mask 0).

:func:`score_micro_batches` runs the forward through Megatron's forward-only schedule
(:func:`~nemo_dcod.model.loading.pipeline_forward`), so the same code runs at any TP x PP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from nemo_dcod.parallel.vocab_parallel import vocab_parallel_logprobs

__all__ = ["ScoredBatch", "score_logits", "score_micro_batches", "vocab_parallel_topk_ids"]


@dataclass
class ScoredBatch:
    """Teacher columns of one micro-batch, fp32 / int32, on the CPU.

    Attributes:
        logprobs: ``[B, S]`` log-prob of each position's label (0 where the label is not a token of
            the same document).
        topk_ids: ``[B, S, K]`` ids of the K most probable tokens (real vocabulary only), or None.
        topk_logprobs: ``[B, S, K]`` their log-probs, decreasing, or None.
    """

    logprobs: Tensor
    topk_ids: Tensor | None
    topk_logprobs: Tensor | None


_NO_CANDIDATE = torch.iinfo(torch.int64).min
_TIE_MARGIN = 8
"""Extra float top-k candidates per row before the exact tie-breaking order is applied."""


def _order_keys(values: Tensor, ids: Tensor) -> Tensor:
    """int64 keys whose order is (value descending, id ascending), exact for float32 values.

    The float32 bits, made monotone in the value (negative floats have their magnitude bits
    flipped), fill the high 32 bits; ``2^32 - 1 - id`` the low ones. One ``topk`` over the keys is
    then the top-k with ties broken by the smaller id, which no float ``topk`` guarantees.
    """
    # + 0.0 turns -0.0 into +0.0 (equal values, which must get the same high bits).
    bits = (values.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits * (1 << 32) + ((1 << 32) - 1 - ids)


def vocab_parallel_topk_ids(
    logits: Tensor,
    k: int,
    *,
    group: ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Global ids of the ``k`` largest logits per row, from vocab shards, padding excluded.

    Args:
        logits: ``[..., V/TP]`` this rank's shard (rank ``r`` owns ids ``[r V/TP, (r+1) V/TP)``);
            ranked in float32.
        k: how many ids; at most ``vocab_size``.
        group: the tensor-parallel group (None: the shard is the whole vocabulary).
        vocab_size: the real vocabulary; columns at or beyond it are never picked. None: all real.
        chunk_size: rows per chunk of the int64 ranking keys (``[rows, V/TP]``); None: all rows.

    Returns:
        ``[..., k]`` int64 global ids, replicated on every rank of the group, ordered by decreasing
        logit, equal logits by increasing id (so the result does not depend on TP).
    """
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    shard = logits.shape[-1]
    start = rank * shard
    real = shard * world if vocab_size is None else vocab_size
    if not 0 < k <= real:
        raise ValueError(f"topk={k}: must be in [1, {real}] (the real vocabulary).")
    valid = max(0, min(shard, real - start))
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, shard)[:, :valid]  # padded columns are never candidates
    # This shard's candidates: its k best real columns, or fewer (the rest: no candidate).
    keys = torch.full((flat.shape[0], k), _NO_CANDIDATE, dtype=torch.long, device=logits.device)
    take = min(k, valid)
    if take:
        # A float top-k of a few more than k columns, then the exact (value, id) order among those
        # candidates only: int64 keys for the whole shard cost several passes over [rows, V/TP]
        # (the scoring loop's largest overhead over a bare forward). Exact whenever the last
        # candidate is strictly below the k-th value (every column tying with the k-th is then a
        # candidate); the rows where it is not (wide ties) take the full-shard keys.
        margin = min(valid, take + _TIE_MARGIN)
        step = chunk_size or max(flat.shape[0], 1)
        for lo in range(0, flat.shape[0], step):
            block = flat[lo : lo + step].float()
            values, columns = block.topk(margin, dim=-1)
            best = _order_keys(values, columns + start).topk(take).values
            wide = (values[:, -1] == values[:, take - 1]) & (margin < valid)
            if bool(wide.any()):
                rows = wide.nonzero()[:, 0]
                ids = torch.arange(start, start + valid, device=logits.device).expand(len(rows), valid)
                best[rows] = _order_keys(block[rows], ids).topk(take).values
            keys[lo : lo + step, :take] = best
    if world > 1:  # K x TP candidates per row travel, not the vocabulary
        gathered = [torch.empty_like(keys) for _ in range(world)]
        dist.all_gather(gathered, keys, group=group)
        keys = torch.cat(gathered, dim=-1)
    best = keys.topk(k, dim=-1).values
    ids = (1 << 32) - 1 - (best & 0xFFFFFFFF)  # the low 32 bits hold 2^32 - 1 - id
    return ids.reshape(*lead, k)


@torch.no_grad()
def score_logits(
    logits: Tensor,
    labels: Tensor,
    label_mask: Tensor,
    *,
    topk: int = 0,
    group: ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> ScoredBatch:
    """Teacher columns from this rank's logit shard (see the module docstring).

    Args:
        logits: ``[B, S, V/TP]`` vocab-parallel logits (any float dtype; math in fp32).
        labels: ``[B, S]`` int64 next-token ids (any valid id where ``label_mask`` is 0).
        label_mask: ``[B, S]`` bool, True where the label is a token of the same document.
        topk: K (0: no top-k).
        group, vocab_size, chunk_size: as for :func:`vocab_parallel_logprobs`.
    """
    ids = labels.unsqueeze(-1).long()
    top = None
    if topk:
        top = vocab_parallel_topk_ids(logits, topk, group=group, vocab_size=vocab_size, chunk_size=chunk_size)
        ids = torch.cat([ids, top], dim=-1)
    out = vocab_parallel_logprobs(
        logits, ids, group=group, vocab_size=vocab_size, chunk_size=chunk_size, mask=label_mask
    )
    keep = label_mask.unsqueeze(-1)
    logprobs = torch.where(keep, out.logprobs, 0.0).float().cpu()
    return ScoredBatch(
        logprobs=logprobs[..., 0],
        topk_ids=torch.where(keep, top, 0).to(torch.int32).cpu() if top is not None else None,
        topk_logprobs=logprobs[..., 1:] if top is not None else None,
    )


def label_mask_of(segment_ids: Tensor) -> Tensor:
    """``[B, S]`` bool: the next position is a token of the same document (padding: never)."""
    same_next = torch.zeros_like(segment_ids, dtype=torch.bool)
    same_next[:, :-1] = segment_ids[:, 1:] == segment_ids[:, :-1]
    return same_next & (segment_ids >= 0)


def score_micro_batches(
    mcore: Any,
    micro_batches: Sequence[dict[str, Tensor]],
    *,
    vocab_size: int,
    topk: int = 0,
    chunk_size: int | None = None,
) -> list[ScoredBatch]:
    """Forward only (no gradients, no optimizer) over micro-batches of store rows; teacher columns.

    Runs under the current Megatron parallel state: every rank of the model-parallel group calls
    it with the same micro-batches; the first stage embeds, the last computes the columns.

    Args:
        mcore: the Megatron ``GPTModel`` (e.g. from :func:`~nemo_dcod.model.loading.load_nemo_model`).
        micro_batches: :func:`~nemo_dcod.data.store.collate_packed` batches (with
            ``attention_mask=True``) on the model's device: ``tokens``, ``labels``,
            ``position_ids``, ``segment_ids`` ``[B, S]`` and ``attention_mask`` ``[B, 1, S, S]``;
            all of one shape.
        vocab_size: the real vocabulary (the tokenizer's); padded output columns are excluded.
        topk: K teacher top-k per position (0: none).
        chunk_size: tokens per chunk of the log-softmax (None: one chunk).

    Returns:
        One :class:`ScoredBatch` per micro-batch on the last pipeline stage (every TP rank of it
        holds the same values); ``[]`` on the other stages.
    """
    from megatron.core import parallel_state

    from nemo_dcod.model.loading import pipeline_forward

    group = parallel_state.get_tensor_model_parallel_group()
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        group = None

    def on_logits(logits: Tensor, batch: dict[str, Tensor]) -> ScoredBatch:
        return score_logits(
            logits,
            batch["labels"],
            label_mask_of(batch["segment_ids"]),
            topk=topk,
            group=group,
            vocab_size=vocab_size,
            chunk_size=chunk_size,
        )

    return pipeline_forward(mcore, micro_batches, on_logits)
