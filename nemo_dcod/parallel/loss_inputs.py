"""From a vocab-parallel logit shard and a batch of traces to a loss value, in one vocabulary pass.

The student quantities every loss needs (the trace token's log-prob, the log-probs at the
teacher's top-k, the tail mass outside it) come from a single call of
:func:`vocab_parallel_logprobs` with ids ``[label, topk_1..topk_K]`` and ``tail_from=1``, so the
``[B, S, V/TP]`` shard is read once (per chunk) whatever the loss.
"""

from __future__ import annotations

from typing import NotRequired, TypedDict

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from nemo_dcod.losses.types import LossContext, LossInputs, LossOutput, LossRequirements, TokenLoss
from nemo_dcod.parallel.vocab_parallel import vocab_parallel_logprobs

__all__ = ["TraceBatch", "loss_from_logits", "student_loss_inputs"]


class TraceBatch(TypedDict):
    """One micro-batch of packed traces, batch-first. Teacher fields as stored by ``score``.

    labels: ``[B, S]`` int64 next-token ids. loss_mask: ``[B, S]`` 0/1.
    teacher_logprobs: ``[B, S]`` float. teacher_topk_ids: ``[B, S, K]`` int64 (distinct per token).
    teacher_topk_logprobs: ``[B, S, K]`` float. segment_ids: ``[B, S]`` int document ids.
    """

    labels: Tensor
    loss_mask: Tensor
    teacher_logprobs: NotRequired[Tensor]
    teacher_topk_ids: NotRequired[Tensor]
    teacher_topk_logprobs: NotRequired[Tensor]
    segment_ids: NotRequired[Tensor]


def _check_distinct(ids: Tensor, mask: Tensor) -> None:
    ordered = ids.sort(dim=-1).values
    dup = (ordered[..., 1:] == ordered[..., :-1]).any(dim=-1) & mask
    count = int(dup.sum())
    if count:
        first = tuple(int(i) for i in dup.nonzero()[0])
        raise ValueError(
            f"teacher_topk_ids: {count} token(s) have repeated ids in their top-k; first at {first}: "
            f"{ids[first].tolist()}. The top-k must be distinct ids (re-run `score`)."
        )


def student_loss_inputs(
    logits: Tensor,
    batch: TraceBatch,
    requirements: LossRequirements,
    *,
    tp_group: ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    validate: bool = True,
) -> LossInputs:
    """The :class:`LossInputs` of a micro-batch from this rank's ``[B, S, V/TP]`` logit shard.

    Args:
        logits: ``[B, S, V/TP]`` vocab-parallel logits (Megatron's output layer, labels omitted).
        batch: the micro-batch; teacher fields are read when ``requirements`` ask for them.
        requirements: what the loss reads (``loss.requirements``).
        tp_group: the tensor-parallel group; vocab_size: the tokenizer's real size (padding is
            excluded); chunk_size: rows per chunk (see :func:`vocab_parallel_logprobs`).
        validate: check that the loss tokens' ids are in range and top-k ids distinct.
    """
    labels, loss_mask = batch["labels"], batch["loss_mask"]
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits: shape {tuple(logits.shape)} does not match labels {tuple(labels.shape)}; expected "
            "[B, S, V/TP] batch-first logits (call the model without labels)."
        )
    mask = loss_mask.bool()
    ids = labels.unsqueeze(-1).long()
    topk = requirements.teacher_topk
    if topk:
        if "teacher_topk_ids" not in batch or "teacher_topk_logprobs" not in batch:
            raise ValueError("teacher_topk_ids: the batch has no teacher top-k; score with topk > 0.")
        topk_ids = batch["teacher_topk_ids"]
        if topk_ids.shape[:2] != labels.shape:
            raise ValueError(
                f"teacher_topk_ids: shape {tuple(topk_ids.shape)} does not match labels "
                f"{tuple(labels.shape)} + (K,)."
            )
        if validate:
            _check_distinct(topk_ids, mask)
        ids = torch.cat([ids, topk_ids.long()], dim=-1)
    out = vocab_parallel_logprobs(
        logits,
        ids,
        group=tp_group,
        vocab_size=vocab_size,
        with_tail=topk,
        tail_from=1 if topk else 0,
        chunk_size=chunk_size,
        mask=mask if validate else None,
    )
    if requirements.teacher_logprobs and "teacher_logprobs" not in batch:
        raise ValueError("teacher_logprobs: the batch has no teacher log-probs; run `score` first.")
    return LossInputs(
        student_logprobs=out.logprobs[..., 0],
        loss_mask=loss_mask,
        teacher_logprobs=batch.get("teacher_logprobs"),
        student_topk_logprobs=out.logprobs[..., 1:] if topk else None,
        student_tail_logprobs=out.tail_logprobs,
        teacher_topk_logprobs=batch.get("teacher_topk_logprobs") if topk else None,
        segment_ids=batch.get("segment_ids"),
    )


def loss_from_logits(
    loss: TokenLoss,
    logits: Tensor,
    batch: TraceBatch,
    ctx: LossContext,
    *,
    tp_group: ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> LossOutput:
    """``loss`` on a micro-batch, straight from vocab-parallel logits: ``(loss_sum, num_tokens, metrics)``."""
    inputs = student_loss_inputs(
        logits,
        batch,
        loss.requirements,
        tp_group=tp_group,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        validate=ctx.validate,
    )
    return loss(inputs, ctx)
