"""Tensor helpers of DisCorD's weights and the baselines: log ratios, documents, windows, sums.

Numerics: everything runs in the student's dtype (>= fp32); Δ is a *difference of per-token* log
probabilities, never an exponentiated sum over a trace; windowed and per-document sums are
accumulated in float64 so that long packed rows don't lose precision to cumulative sums. The
variants of Δ that use them are in :mod:`nemo_dcod.losses.variants`.

**Fused chain.** After the vocab-parallel log-prob, DisCorD's weights are a chain of small
element-wise ops over ``[B, S]`` (clip, gate, normalise, mix) plus the diagnostics' sums: on a GPU
each is its own kernel launch, and reading b and ḡ back to the host syncs the stream. The math
lives once, in the small pure helpers below (:func:`clip_delta`, :func:`sigmoid_gate`,
:func:`mix_weights`, :func:`masked_histogram`), called by DisCorD's step-by-step path and by the
fused functions :func:`token_weight_chain` / :func:`weight_chain`, whose scalars (λ, b, ḡ) are
0-dim device tensors so that nothing leaves the device. :func:`fused` runs them through
``torch.compile`` on CUDA tensors (a few generated kernels; Megatron-core's ``jit_fuser``
pattern) and falls back to calling them eagerly, with one warning, where compiling fails; on CPU
they run eagerly (the same ops, without the host syncs).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from nemo_dcod.losses.types import masked

__all__ = [
    "COMPILE_ENV",
    "WEIGHT_HIST_EDGES",
    "ChainSums",
    "all_reduce_sum",
    "clip_delta",
    "document_index",
    "fused",
    "fusion_fallbacks",
    "gate_sum",
    "log_ratio",
    "masked_histogram",
    "mix_weights",
    "per_document_mean",
    "prefix_window_mean",
    "sigmoid_gate",
    "token_weight_chain",
    "weight_chain",
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


# ----------------------------------------------------------------------------------------------
# The weight chain: small pure helpers, shared by the step-by-step and the fused paths.
# ----------------------------------------------------------------------------------------------

# Histogram bins of w (the diagnostics' weight_hist): [0, 0.25), [0.25, 0.5), ..., [4, inf).
WEIGHT_HIST_EDGES: tuple[float, ...] = tuple(0.25 * i for i in range(17))

Scalar = Tensor | float


def clip_delta(raw: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """``(clamp(raw, -c, c), |raw| > c)``: Δ and whether it was clipped, both shaped like ``raw``."""
    return raw.clamp(-clip, clip), raw.abs() > clip


def sigmoid_gate(delta: Tensor, center: Scalar, tau: float) -> Tensor:
    """g = sigmoid((Δ - b) / τ), shaped like ``delta``; ``center`` is b (0 without centring)."""
    return torch.sigmoid((delta - center) / tau)


def mix_weights(g: Tensor, g_mean: Scalar, lam: Scalar) -> Tensor:
    """w = (1 - λ) + λ · g / ḡ, shaped like ``g`` (before any cap)."""
    return (1.0 - lam) + lam * g / g_mean


def masked_histogram(values: Tensor, mask: Tensor, edges: tuple[float, ...] = WEIGHT_HIST_EDGES) -> Tensor:
    """Counts (float64, ``[len(edges)]``) of ``values`` on ``mask`` in the bins ``[e_i, e_i+1)``, the last
    bin open-ended, values below ``e_0`` in the first; no boolean indexing (no host sync)."""
    bounds = torch.tensor(edges, dtype=torch.float64, device=values.device)
    index = ((values.to(torch.float64).unsqueeze(-1) >= bounds).sum(-1) - 1).clamp_min(0)
    hits = (index.unsqueeze(-1) == torch.arange(len(edges), device=values.device)) & mask.unsqueeze(-1)
    return hits.flatten(0, -2).sum(0).to(torch.float64)


def _sum64(values: Tensor, mask: Tensor) -> Tensor:
    return masked(values.to(torch.float64), mask).sum()


ChainSums = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
"""float64 sums over loss tokens: (tokens, Σw, Σw², Σ Δ, Σ Δ², #clipped, Σ g, #capped, weight histogram)."""


def weight_chain(
    delta: Tensor,
    clipped: Tensor,
    mask: Tensor,
    lam: Tensor,
    center: Tensor,
    g_mean: Tensor,
    tau: float,
    w_max: Tensor,
) -> tuple[Tensor, Tensor, ChainSums]:
    """Gate, weights and their diagnostic sums from Δ, in one pure function (fusable).

    Args:
        delta: ``[B, S]`` Δ (0 off the mask). clipped: ``[B, S]`` bool. mask: ``[B, S]`` bool.
        lam: 0-dim λ. center: 0-dim b (0 without centring). g_mean: 0-dim ḡ (1 is used when <= 0).
        tau: τ > 0. w_max: 0-dim cap on w (inf: none); the tokens it lowered are counted.

    Returns:
        ``(weights [B, S], g [B, S], sums)``: the weights (not masked, detached inputs only) and the
        :data:`ChainSums` of the diagnostics.
    """
    g = sigmoid_gate(delta, center, tau)
    uncapped = mix_weights(g, torch.where(g_mean > 0, g_mean, torch.ones_like(g_mean)), lam)
    weights = torch.minimum(uncapped, w_max.to(uncapped.dtype))
    sums = (
        mask.sum().to(torch.float64),
        _sum64(weights, mask),
        _sum64(weights * weights, mask),
        _sum64(delta, mask),
        _sum64(delta * delta, mask),
        (clipped & mask).sum().to(torch.float64),
        _sum64(g, mask),
        ((uncapped > weights) & mask).sum().to(torch.float64),
        masked_histogram(weights, mask),
    )
    return weights, g, sums


def token_weight_chain(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    lam: Tensor,
    center: Tensor,
    g_mean: Tensor,
    clip: float,
    tau: float,
    w_max: Tensor,
) -> tuple[Tensor, Tensor, Tensor, ChainSums]:
    """The whole token-variant chain from the log-probs: Δ, gate, weights and sums (fusable).

    Args:
        student_logprobs: ``[B, S]`` lq (its gradient is not used). teacher_logprobs: ``[B, S]`` lp.
        mask: ``[B, S]`` bool. lam, center, g_mean, w_max: 0-dim λ, b, ḡ, cap. clip: c. tau: τ.

    Returns:
        ``(weights, delta, g, sums)``, all ``[B, S]`` but the :data:`ChainSums`.
    """
    delta, clipped = clip_delta(log_ratio(student_logprobs, teacher_logprobs, mask), clip)
    delta = masked(delta, mask)
    weights, g, sums = weight_chain(delta, clipped, mask, lam, center, g_mean, tau, w_max)
    return weights, delta, g, sums


def gate_sum(delta: Tensor, mask: Tensor, center: Tensor, tau: float) -> Tensor:
    """Σ m · sigmoid((Δ - b) / τ), float64 0-dim: the numerator of ḡ (fusable)."""
    return _sum64(sigmoid_gate(delta, center, tau), mask)


COMPILE_ENV = "DCOD_COMPILE_WEIGHTS"
"""Environment variable: ``0`` runs the fused chain eagerly on GPUs too; ``1`` compiles it on CPU
as well (tests); unset: compiled on CUDA tensors only."""

F = TypeVar("F", bound=Callable[..., Any])
_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}
_FALLBACKS: list[str] = []


def fusion_fallbacks() -> list[str]:
    """Why compiling the chain failed in this process (empty: every call that asked was compiled)."""
    return list(_FALLBACKS)


def _wants_compile(device: torch.device) -> bool:
    choice = os.environ.get(COMPILE_ENV, "").strip()
    if choice == "0" or _FALLBACKS:
        return False
    return choice == "1" or device.type == "cuda"


def fused(fn: F, device: torch.device) -> F:
    """``fn`` compiled with ``torch.compile`` for tensors on ``device`` where that is wanted (see
    :data:`COMPILE_ENV`), else ``fn`` itself. A compilation that fails (no compiler, an
    unsupported op) warns once and every later call runs eagerly: same values, more kernels."""
    if not _wants_compile(device):
        return fn
    compiled = _COMPILED.get(fn)
    if compiled is None:
        compiled = _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=None)

    def call(*args: Any) -> Any:
        if _FALLBACKS:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as exc:  # any backend failure: the eager function computes the same
            _FALLBACKS.append(f"{fn.__name__}: {type(exc).__name__}: {str(exc)[:300]}")
            warnings.warn(
                f"DisCorD's fused weight chain could not be compiled ({_FALLBACKS[-1]}); running it "
                f"eagerly (set {COMPILE_ENV}=0 to skip compiling).",
                RuntimeWarning,
                stacklevel=2,
            )
            return fn(*args)

    return call  # type: ignore[return-value]
