"""DisCorD's per-token weights: log support ratio, its variants, the sigmoid gate, the λ schedule.

    Δ_t = clip(stopgrad(lq_t) - lp_t, -c, c)          (token variant)
    g_t = sigmoid((Δ_t - b) / τ)
    w_t = (1 - λ) + λ · g_t / ḡ

Variants of Δ (one config field apart):

* ``token``: Δ_t as above.
* ``prefix``: the mean of the clipped Δ over the causal window of the last ``W`` loss tokens up to
  and including t, reset at document boundaries: a smoother, lower-variance estimate of how well
  the student supports the recent part of the trace.
* ``sequence``: one value per document, ``clip(mean_t (lq_t - lp_t), -c, c)``, broadcast to its
  tokens (length-normalised, as in iw-SFT, but through the same bounded gate).

Numerics: everything runs in the student's dtype (>= fp32); Δ is a *difference of per-token* log
probabilities, never an exponentiated sum over a trace; windowed and per-document sums are
accumulated in float64 so that long packed rows don't lose precision to cumulative sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from nemo_dcod.losses.types import masked

__all__ = [
    "LambdaSchedule",
    "Variant",
    "all_reduce_sum",
    "document_index",
    "log_ratio",
    "per_document_mean",
    "prefix_window_mean",
]

Variant = Literal["token", "prefix", "sequence"]


@dataclass(frozen=True)
class LambdaSchedule:
    """λ(step): 0 for the first ``warmup_fraction`` of steps, then linear to ``lambda_max``.

    Attributes:
        lambda_max: the final mixing weight in [0, 1] (1: pure DisCorD weights, 0: SFT).
        warmup_fraction: fraction of steps with λ = 0, in [0, 1).
        ramp_fraction: fraction of steps of the linear ramp after the warm-up, in [0, 1].
    """

    lambda_max: float = 1.0
    warmup_fraction: float = 0.0
    ramp_fraction: float = 0.0

    def __call__(self, step: int, total_steps: int) -> float:
        total = max(total_steps, 1)
        warm = self.warmup_fraction * total
        if step < warm:
            return 0.0
        ramp = self.ramp_fraction * total
        if ramp <= 0:
            return self.lambda_max
        return self.lambda_max * min(1.0, (step - warm + 1) / ramp)


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
