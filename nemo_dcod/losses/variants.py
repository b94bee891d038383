"""How DisCorD forms Δ from the per-token log ratio: the ``variant`` of the loss, one function each.

A variant maps the raw masked log ratio ``stopgrad(lq) - lp`` (``[B, S]``) to Δ (``[B, S]``, the
value the gate reads) and the ``[B, S]`` bool of positions whose raw value was clipped. The
built-ins:

* ``token``: Δ_t = clip(r_t, -c, c);
* ``prefix``: Δ_t = mean of clip(r) over the loss tokens among the last W positions of t's
  document (a causal window; reset at each document boundary);
* ``sequence``: Δ_t = clip(mean_{s∈d} r_s, -c, c), one value per document d (length-normalised,
  as iw-SFT's weight).

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
