"""Tensor helpers of DisCorD's weights and the baselines: log ratios, documents, windows, sums.

Numerics: everything runs in the student's dtype (>= fp32); Δ is a *difference of per-token* log
probabilities, never an exponentiated sum over a trace; windowed and per-document sums are
accumulated in float64 so that long packed rows don't lose precision to cumulative sums. The
variants of Δ that use them are in :mod:`nemo_dcod.losses.variants`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from nemo_dcod.losses.types import masked

__all__ = [
    "all_reduce_sum",
    "document_index",
    "log_ratio",
    "per_document_mean",
    "prefix_window_mean",
]


def all_reduce_sum(values: list[Tensor], group: ProcessGroup | None) -> list[Tensor]:
    """Sum scalar tensors over ``group`` in one collective (no autograd: statistics only)."""
    stacked = torch.stack([v.detach().to(torch.float64) for v in values])
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(stacked, group=group)
    return list(stacked.unbind())


def log_ratio(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``stopgrad(lq) - lp`` on loss tokens, 0 elsewhere: ``[B, S]``."""
    lq = student_logprobs.detach()
    return masked(lq - teacher_logprobs.to(lq.dtype), mask)


def document_index(segment_ids: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    """``[B, S]`` index of each token's document within its row, 0, 1, 2, ... in order.

    A new document starts at position 0 and wherever ``segment_ids`` changes.
    """
    if segment_ids is None:
        return torch.zeros(shape, dtype=torch.long, device=device)
    starts = torch.ones(shape, dtype=torch.long, device=device)
    starts[:, 1:] = (segment_ids[:, 1:] != segment_ids[:, :-1]).long()
    return starts.cumsum(dim=1) - 1


def prefix_window_mean(values: Tensor, mask: Tensor, doc_index: Tensor, window: int) -> Tensor:
    """Mean of ``values`` over the loss tokens among the last ``window`` positions of a document.

    For token t of a document starting at ``d``: positions ``max(t - window + 1, d) .. t``. Padded
    cumulative sums in float64; a window with no loss token gives 0.

    Args:
        values: ``[B, S]`` (already 0 off the mask). mask: ``[B, S]`` bool. doc_index: ``[B, S]``.
        window: W >= 1.
    """
    batch, seq = values.shape
    dev = values.device
    zeros = torch.zeros(batch, 1, dtype=torch.float64, device=dev)
    csum = torch.cat([zeros, masked(values, mask).to(torch.float64).cumsum(dim=1)], dim=1)
    ccount = torch.cat([zeros, mask.to(torch.float64).cumsum(dim=1)], dim=1)
    pos = torch.arange(seq, device=dev).expand(batch, seq)
    is_start = torch.ones_like(mask)
    is_start[:, 1:] = doc_index[:, 1:] != doc_index[:, :-1]
    doc_start = torch.where(is_start, pos, torch.zeros_like(pos)).cummax(dim=1).values
    lo = torch.maximum(pos - window + 1, doc_start)
    hi = pos + 1
    total = csum.gather(1, hi) - csum.gather(1, lo)
    count = ccount.gather(1, hi) - ccount.gather(1, lo)
    return (total / count.clamp_min(1.0)).to(values.dtype)


def per_document_mean(values: Tensor, mask: Tensor, doc_index: Tensor) -> Tensor:
    """Each token gets the mean of ``values`` over its document's loss tokens (0 if it has none).

    Args:
        values: ``[B, S]``. mask: ``[B, S]`` bool. doc_index: ``[B, S]`` from :func:`document_index`.
    """
    batch, seq = values.shape
    key = (doc_index + torch.arange(batch, device=values.device).unsqueeze(1) * seq).reshape(-1)
    sums = torch.zeros(batch * seq, dtype=torch.float64, device=values.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, key, masked(values, mask).to(torch.float64).reshape(-1))
    counts.index_add_(0, key, mask.to(torch.float64).reshape(-1))
    mean = sums / counts.clamp_min(1.0)
    return mean.gather(0, key).reshape(batch, seq).to(values.dtype)
