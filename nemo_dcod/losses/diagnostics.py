"""Per-step diagnostics of token weights, as *sums* that add up across micro-batches and ranks.

A loss returns sums (``tokens``, ``weight_sum``, ``weight_sq_sum``, ``delta_sum``, ...) for its
micro-batch; :func:`reduce_metrics` adds those of several micro-batches (and all-reduces them over
a group), then derives the ratios once, so a logged ESS or mean Δ is the global batch's, never a
mean of per-micro-batch ratios:

    ESS       = (Σ w)² / (n Σ w²)                 (1: uniform weights; 1/n: one token dominates)
    gate ESS  = (Σ g)² / (n Σ g²)                 (DisCorD's gate alone: the weights' ESS at λ = 1)
    Δ mean    = Σ Δ / n,  Δ std = sqrt(Σ Δ² / n - mean²)
    clipped   = #{|Δ_raw| > c} / n
    capped    = #{w lowered to w_max} / n       (DisCorD's optional cap)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from nemo_dcod.losses.types import masked

__all__ = ["WEIGHT_HIST_EDGES", "derive_metrics", "reduce_metrics", "weight_sums"]

# Histogram bins of w: [0, 0.25), [0.25, 0.5), ..., [3.75, 4), [4, inf).
WEIGHT_HIST_EDGES: tuple[float, ...] = tuple(0.25 * i for i in range(17))

_DERIVED = (
    "weight_mean",
    "ess",
    "delta_mean",
    "delta_std",
    "clip_fraction",
    "capped_fraction",
    "g_mean",
    "gate_ess",
)
_SUMMED = (
    "tokens",
    "weight_sum",
    "weight_sq_sum",
    "delta_sum",
    "delta_sq_sum",
    "clipped_count",
    "g_sum",
    "g_sq_sum",
    "capped_count",
)


def weight_sums(
    weights: Tensor,
    mask: Tensor,
    delta: Tensor | None = None,
    clipped: Tensor | None = None,
    g: Tensor | None = None,
    capped: Tensor | None = None,
) -> dict[str, Tensor]:
    """Local sums of the weight diagnostics over loss tokens. All tensors ``[B, S]``, detached
    (``capped``: bool, the weights a cap lowered)."""
    w = masked(weights.detach().to(torch.float64), mask)
    out = {
        "tokens": mask.sum().to(torch.float64),
        "weight_sum": w.sum(),
        "weight_sq_sum": (w * w).sum(),
        "weight_hist": _histogram(weights.detach()[mask]),
    }
    if delta is not None:
        d = masked(delta.detach().to(torch.float64), mask)
        out["delta_sum"] = d.sum()
        out["delta_sq_sum"] = (d * d).sum()
    if clipped is not None:
        out["clipped_count"] = (clipped & mask).sum().to(torch.float64)
    if g is not None:
        out["g_sum"] = masked(g.detach().to(torch.float64), mask).sum()
    if capped is not None:
        out["capped_count"] = (capped & mask).sum().to(torch.float64)
    return out


def _histogram(values: Tensor) -> Tensor:
    edges = torch.tensor(WEIGHT_HIST_EDGES, dtype=torch.float64, device=values.device)
    bins = torch.bucketize(values.to(torch.float64), edges, right=True) - 1  # [0, len(edges) - 1]
    return torch.bincount(bins.clamp_min(0), minlength=len(edges)).to(torch.float64)


def derive_metrics(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add the ratios (ESS, mean/std of Δ, clipped fraction, mean g and w) to a dict of sums."""
    out = dict(sums)
    n = float(sums["tokens"])
    if n <= 0:
        return out
    dev = sums["tokens"].device

    def scalar(x: float) -> Tensor:
        return torch.tensor(x, dtype=torch.float64, device=dev)

    sw, sw2 = float(sums["weight_sum"]), float(sums["weight_sq_sum"])
    out["weight_mean"] = scalar(sw / n)
    out["ess"] = scalar(sw * sw / (n * sw2) if sw2 > 0 else 0.0)
    if "delta_sum" in sums:
        mean = float(sums["delta_sum"]) / n
        out["delta_mean"] = scalar(mean)
        out["delta_std"] = scalar(math.sqrt(max(float(sums["delta_sq_sum"]) / n - mean * mean, 0.0)))
    if "clipped_count" in sums:
        out["clip_fraction"] = scalar(float(sums["clipped_count"]) / n)
    if "capped_count" in sums:
        out["capped_fraction"] = scalar(float(sums["capped_count"]) / n)
    if "g_sum" in sums:
        out["g_mean"] = scalar(float(sums["g_sum"]) / n)
    if "g_sum" in sums and "g_sq_sum" in sums:  # the gate's ESS, ḡ² / mean(g²): what the ESS guard reads
        sg, sg2 = float(sums["g_sum"]), float(sums["g_sq_sum"])
        out["gate_ess"] = scalar(sg * sg / (n * sg2) if sg2 > 0 else 0.0)
    return out


def reduce_metrics(metrics: list[dict[str, Tensor]], group: ProcessGroup | None = None) -> dict[str, Tensor]:
    """Sum the additive entries of several micro-batches' metrics, all-reduce, and derive ratios.

    Non-additive entries (e.g. ``lambda``) are taken from the first micro-batch.
    """
    if not metrics:
        return {}
    keys = [k for k in metrics[0] if k in _SUMMED or k == "weight_hist"]
    flat = [torch.cat([m[k].detach().to(torch.float64).reshape(-1) for k in keys]) for m in metrics]
    total = torch.stack(flat).sum(dim=0)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    summed: dict[str, Tensor] = {}
    offset = 0
    for k in keys:
        size = metrics[0][k].numel()
        summed[k] = total[offset : offset + size].reshape(metrics[0][k].shape)
        offset += size
    static = {k: v for k, v in metrics[0].items() if k not in summed and k not in _DERIVED}
    return static | derive_metrics(summed)
