"""Token-level divergences between a stored teacher top-k and the student, with a tail bucket.

Only the teacher's top-k log-probs are stored offline, so the teacher distribution is known on K
ids plus one bucket, the *tail*, holding the rest of its mass ``p_tail = 1 - Σ_k p_k``. The
student is coarsened the same way: ``q_k`` at the K ids and ``q_tail`` for everything else (given
by the vocab-parallel op as the log of the mass of the other columns, with no cancellation). Each
divergence below is the exact divergence between those two (K+1)-bucket distributions. By the
data-processing inequality the bucketed forward KL is a lower bound of the full KL, tight when the
teacher's top-k holds its mass.

All functions take ``[..., K]`` top-k log-probs and ``[...]`` tail log-probs, return ``[...]``,
and work in the student's dtype. Teacher tensors never carry gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["teacher_tail_logprobs", "todi_topk", "topk_forward_kl"]


def teacher_tail_logprobs(teacher_topk_logprobs: Tensor) -> Tensor:
    """``log(1 - Σ_k p_k)`` computed stably: ``[..., K]`` -> ``[...]``; ``-inf`` for an empty tail.

    ``log1p(-Σp)`` keeps precision when the top-k mass is small; a sum that rounds slightly above
    one (stored log-probs are rounded) is clamped to an empty tail rather than a NaN.
    """
    mass = teacher_topk_logprobs.exp().sum(dim=-1)
    return torch.log1p(-mass.clamp(max=1.0))


def topk_forward_kl(
    student_topk_logprobs: Tensor,
    student_tail_logprobs: Tensor,
    teacher_topk_logprobs: Tensor,
) -> Tensor:
    """Forward KL(p || q) over the teacher's top-k plus a tail bucket.

        KL = Σ_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail)

    Args:
        student_topk_logprobs: ``[..., K]`` log q at the teacher's top-k ids (carries gradient).
        student_tail_logprobs: ``[...]`` log q of the mass outside those ids (carries gradient).
        teacher_topk_logprobs: ``[..., K]`` log p at the top-k ids (finite, <= 0).

    Returns:
        ``[...]`` the bucketed KL, >= 0 up to rounding.
    """
    lp = teacher_topk_logprobs.to(student_topk_logprobs.dtype)
    p = lp.exp()
    lp_tail = teacher_tail_logprobs(lp)
    p_tail = lp_tail.exp()
    # xlogy(p, p) = p log p with 0 log 0 = 0, so an empty tail contributes exactly nothing.
    topk_term = (p * (lp - student_topk_logprobs)).sum(dim=-1)
    tail_term = torch.xlogy(p_tail, p_tail) - p_tail * student_tail_logprobs
    return topk_term + tail_term


def todi_topk(
    student_topk_logprobs: Tensor,
    student_tail_logprobs: Tensor,
    teacher_topk_logprobs: Tensor,
    beta: float = 1.0,
) -> Tensor:
    """ToDi: a per-vocabulary-entry sigmoid mix of forward and reverse KL terms.

    Jeong et al., "ToDi: Token-wise Distillation via Fine-Grained Divergence Control", arXiv
    2505.16297 (2025). For each bucket v (top-k ids and the tail):

        α_v = sigmoid(β · stopgrad(log p_v - log q_v))
        ℓ   = Σ_v α_v p_v (log p_v - log q_v) + (1 - α_v) q_v (log q_v - log p_v)

    Where the teacher puts more mass than the student (α -> 1) the forward-KL term pulls the
    student up; where the student over-shoots (α -> 0) the reverse-KL term pushes it down.

    Args:
        student_topk_logprobs: ``[..., K]``; student_tail_logprobs: ``[...]``;
        teacher_topk_logprobs: ``[..., K]``, as in :func:`topk_forward_kl`.
        beta: sharpness of the sigmoid gate.
    """
    lp = teacher_topk_logprobs.to(student_topk_logprobs.dtype)
    lp_all = torch.cat([lp, teacher_tail_logprobs(lp).unsqueeze(-1)], dim=-1)
    lq_all = torch.cat([student_topk_logprobs, student_tail_logprobs.unsqueeze(-1)], dim=-1)
    p, q = lp_all.exp(), lq_all.exp()
    # An empty teacher tail has lp = -inf: its log-ratio is -inf, α = 0, and the reverse term
    # q (lq - lp) would be +inf. Floor lp there at the student's own value minus a large margin
    # so the bucket contributes a finite push-down instead (it is a bucket of vanishing mass).
    finite_lp = torch.where(torch.isfinite(lp_all), lp_all, lq_all.detach() - 30.0)
    log_ratio = finite_lp - lq_all
    alpha = torch.sigmoid(beta * log_ratio.detach())
    forward = torch.where(p > 0, p * log_ratio, torch.zeros_like(p))
    reverse = q * (-log_ratio)
    return (alpha * forward + (1.0 - alpha) * reverse).sum(dim=-1)
