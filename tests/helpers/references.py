"""Straightforward float64 references, written independently of the library's vectorised code.

Loops over tokens and documents, full-vocabulary ``log_softmax``: slow and obviously right.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def full_logprobs(logits: Tensor, vocab_size: int) -> Tensor:
    """``[..., V]`` full logits -> ``[..., vocab_size]`` log-softmax over the real vocabulary."""
    return torch.log_softmax(logits[..., :vocab_size], dim=-1)


def tail_logprob(logprobs: Tensor, ids: Tensor) -> Tensor:
    """``[..., V]`` log-probs, ``[..., K]`` ids -> log of the mass outside the ids."""
    keep = torch.ones_like(logprobs, dtype=torch.bool)
    keep.scatter_(-1, ids, False)
    return torch.logsumexp(logprobs.masked_fill(~keep, -math.inf), dim=-1)


def entropy(logprobs: Tensor) -> Tensor:
    return -(logprobs.exp() * logprobs).sum(-1)


def documents(segment_ids: Tensor | None, row: int, seq: int) -> list[list[int]]:
    """Positions of each document of one row, in order."""
    docs: list[list[int]] = []
    for t in range(seq):
        new = t == 0 or (segment_ids is not None and segment_ids[row, t] != segment_ids[row, t - 1])
        if new:
            docs.append([])
        docs[-1].append(t)
    return docs


def forward_kl_buckets(p_topk: list[float], q_topk: list[float], q_tail: float) -> float:
    p_tail = max(0.0, 1.0 - sum(p_topk))
    kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(p_topk, q_topk, strict=True) if p > 0)
    if p_tail > 0:
        kl += p_tail * (math.log(p_tail) - math.log(q_tail))
    return kl


def discord_weights(
    lq: Tensor,
    lp: Tensor,
    mask: Tensor,
    segment_ids: Tensor | None,
    *,
    variant: str,
    tau: float,
    center: bool,
    clip: float,
    window: int,
    lam: float,
) -> Tensor:
    """DisCorD weights by the book (DESIGN.md §1), one token at a time. Returns ``[B, S]``."""
    batch, seq = lq.shape
    delta = torch.zeros(batch, seq, dtype=torch.float64)
    for b in range(batch):
        for doc in documents(segment_ids, b, seq):
            loss_tokens = [t for t in doc if mask[b, t]]
            if variant == "sequence":
                if loss_tokens:
                    mean = sum(float(lq[b, t] - lp[b, t]) for t in loss_tokens) / len(loss_tokens)
                    for t in loss_tokens:
                        delta[b, t] = min(max(mean, -clip), clip)
                continue
            for t in loss_tokens:
                if variant == "token":
                    delta[b, t] = min(max(float(lq[b, t] - lp[b, t]), -clip), clip)
                else:  # prefix: mean of clipped Δ over the loss tokens of the last W positions
                    win = [u for u in loss_tokens if t - window < u <= t]
                    vals = [min(max(float(lq[b, u] - lp[b, u]), -clip), clip) for u in win]
                    delta[b, t] = sum(vals) / len(vals)
    tokens = [(b, t) for b in range(batch) for t in range(seq) if mask[b, t]]
    bias = sum(float(delta[b, t]) for b, t in tokens) / len(tokens) if center else 0.0
    g = torch.sigmoid((delta - bias) / tau)
    g_mean = sum(float(g[b, t]) for b, t in tokens) / len(tokens)
    return (1 - lam) + lam * g / g_mean
