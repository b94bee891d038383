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
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["FIRST_STAGE_KEYS", "LAST_STAGE_KEYS", "logits_forward_step", "trace_data_step"]

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

ALL_STAGE_KEYS = ("attention_mask",)


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
        if key in needed and isinstance(value, torch.Tensor):
            out[key] = value.cuda(non_blocking=True)
        else:
            out[key] = None
    result: dict[str, torch.Tensor | None] = get_batch_on_this_cp_rank(out)
    return result


def logits_forward_step(model: Any, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Run the model without labels: the last stage returns logits ``[B, S, V/TP]``.

    Args:
        model: the NeMo ``GPTModel`` (its ``forward`` calls Megatron's ``GPTModel``).
        batch: from :func:`trace_data_step`.
    """
    output: torch.Tensor = model(
        input_ids=batch.get("tokens"),
        position_ids=batch.get("position_ids"),
        attention_mask=batch.get("attention_mask"),
        labels=None,
    )
    return output
