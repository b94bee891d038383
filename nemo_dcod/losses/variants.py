"""How DisCorD forms Δ from the per-token log ratio: the ``variant`` of the loss, one function each.

A variant maps the raw masked log ratio ``stopgrad(lq) - lp`` (``[B, S]``) to Δ (``[B, S]``, the
value the gate reads) and the ``[B, S]`` bool of positions whose raw value was clipped. The
built-ins:

* ``token``: Δ_t = clip(r_t, -c, c);
* ``prefix``: Δ_t = mean of clip(r) over the loss tokens among the last W positions of t's
  document (a causal window; reset at each document boundary);
* ``sequence``: Δ_t = clip(mean_{s∈d} r_s, -c, c), one value per document d (length-normalised,
  as iw-SFT's weight).

How Δ is *aggregated* over a document is an axis of its own (``nemo-dcod study`` measures it); three
more aggregations, each a document-level function of the per-token ratios:

* ``sum``: Δ_t = clip(Σ_{s∈d} r_s, -c, c): the trace's whole log ratio (not length-normalised: a
  long trace with many small deficits is penalised as much as a short one with a large deficit);
* ``centered``: Δ_t = clip(r_t, -c, c) - mean_{s∈d} clip(r_s, -c, c): each token against its own
  document's mean (what is unusual *within* a trace, not between traces);
* ``min``: Δ_t = min_{s∈d} clip(r_s, -c, c): every token of a trace gets the trace's worst token
  (one token the student cannot produce gates the whole trace, undiluted by its length).

A new variant is one function registered with :func:`register_variant` (in its own module, imported
through the loss section's ``module``); it may read the loss's parameters (``loss.clip``,
``loss.window``). Torch is imported when a variant runs, not when it is registered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from nemo_dcod.losses.types import LossInputs

__all__ = ["VARIANTS", "WHOLE_DOCUMENT_VARIANTS", "register_variant"]

VariantFn = Callable[[Any, "Tensor", "LossInputs"], "tuple[Tensor, Tensor]"]
VARIANTS: dict[str, VariantFn] = {}
"""name -> ``fn(loss, raw [B, S], inputs) -> (delta [B, S], clipped [B, S] bool)``."""
WHOLE_DOCUMENT_VARIANTS: set[str] = set()
"""Variants that read a whole document (a window or a mean): context parallelism is refused."""


def register_variant(name: str, whole_documents: bool = False) -> Callable[[VariantFn], VariantFn]:
    """Decorator: make ``fn`` DisCorD's ``variant=name``.

    Args:
        name: the variant's name in configs.
        whole_documents: Δ of a token depends on other tokens of its document.
    """

    def add(fn: VariantFn) -> VariantFn:
        VARIANTS[name] = fn
        if whole_documents:
            WHOLE_DOCUMENT_VARIANTS.add(name)
        return fn

    return add


@register_variant("token")
def token_delta(loss: Any, raw: Tensor, inputs: LossInputs) -> tuple[Tensor, Tensor]:
    """Δ_t = clip(r_t, -c, c)."""
    from nemo_dcod.losses.types import masked

    return masked(raw.clamp(-loss.clip, loss.clip), inputs.mask), raw.abs() > loss.clip


@register_variant("prefix", whole_documents=True)
def prefix_delta(loss: Any, raw: Tensor, inputs: LossInputs) -> tuple[Tensor, Tensor]:
    """Δ_t = mean of the clipped r over the causal window of W positions in t's document."""
    from nemo_dcod.losses.types import masked
    from nemo_dcod.losses.weights import document_index, prefix_window_mean

    mask = inputs.mask
    docs = document_index(inputs.segment_ids, raw.shape, raw.device)
    delta = prefix_window_mean(raw.clamp(-loss.clip, loss.clip), mask, docs, loss.window)
    return masked(delta, mask), raw.abs() > loss.clip


@register_variant("sequence", whole_documents=True)
def sequence_delta(loss: Any, raw: Tensor, inputs: LossInputs) -> tuple[Tensor, Tensor]:
    """Δ_t = clip(mean_{s∈d} r_s, -c, c) for t in document d."""
    from nemo_dcod.losses.types import masked
    from nemo_dcod.losses.weights import document_index, per_document_mean

    mask = inputs.mask
    docs = document_index(inputs.segment_ids, raw.shape, raw.device)
    mean = per_document_mean(raw, mask, docs)
    return masked(mean.clamp(-loss.clip, loss.clip), mask), mean.abs() > loss.clip


def _document_keys(raw: Tensor, inputs: LossInputs) -> Tensor:
    """``[B*S]`` index of each position's document, unique over the batch."""
    import torch

    from nemo_dcod.losses.weights import document_index

    batch, seq = raw.shape
    docs = document_index(inputs.segment_ids, raw.shape, raw.device)
    return (docs + torch.arange(batch, device=raw.device).unsqueeze(1) * seq).reshape(-1)


@register_variant("sum", whole_documents=True)
def sum_delta(loss: Any, raw: Tensor, inputs: LossInputs) -> tuple[Tensor, Tensor]:
    """Δ_t = clip(Σ_{s∈d} r_s, -c, c) for t in document d (float64 sums)."""
    import torch

    from nemo_dcod.losses.types import masked

    mask = inputs.mask
    key = _document_keys(raw, inputs)
    sums = torch.zeros(key.numel(), dtype=torch.float64, device=raw.device)
    sums.index_add_(0, key, masked(raw, mask).to(torch.float64).reshape(-1))
    total = sums.gather(0, key).reshape(raw.shape).to(raw.dtype)
    return masked(total.clamp(-loss.clip, loss.clip), mask), mask & (total.abs() > loss.clip)


@register_variant("centered", whole_documents=True)
def centered_delta(loss: Any, raw: Tensor, inputs: LossInputs) -> tuple[Tensor, Tensor]:
    """Δ_t = clip(r_t, -c, c) - mean_{s∈d} clip(r_s, -c, c) for t in document d."""
    from nemo_dcod.losses.types import masked
    from nemo_dcod.losses.weights import document_index, per_document_mean

    mask = inputs.mask
    clipped = masked(raw.clamp(-loss.clip, loss.clip), mask)
    docs = document_index(inputs.segment_ids, raw.shape, raw.device)
    return masked(clipped - per_document_mean(clipped, mask, docs), mask), raw.abs() > loss.clip


@register_variant("min", whole_documents=True)
def min_delta(loss: Any, raw: Tensor, inputs: LossInputs) -> tuple[Tensor, Tensor]:
    """Δ_t = min_{s∈d} clip(r_s, -c, c) for t in document d (its worst loss token)."""
    import torch

    from nemo_dcod.losses.types import masked

    mask = inputs.mask
    key = _document_keys(raw, inputs)
    inf = torch.full((), torch.inf, dtype=torch.float64, device=raw.device)
    values = torch.where(mask, raw.clamp(-loss.clip, loss.clip).to(torch.float64), inf).reshape(-1)
    lowest = torch.full((key.numel(),), torch.inf, dtype=torch.float64, device=raw.device)
    lowest.scatter_reduce_(0, key, values, reduce="amin", include_self=True)
    delta = lowest.gather(0, key).reshape(raw.shape)
    return masked(delta.to(raw.dtype), mask), raw.abs() > loss.clip
