"""``kl``: forward KL to the stored teacher top-k, with a tail bucket for the rest of the vocabulary.

    ℓ_t = Σ_{v ∈ topk} p(v) [log p(v) - log q_θ(v)] + p(tail) [log p(tail) - log q_θ(tail)]

(:func:`~nemo_dcod.losses.divergences.topk_forward_kl`). Reads ``score``'s top-k columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nemo_dcod.losses.registry import LossRequirements, register

if TYPE_CHECKING:
    from nemo_dcod.losses.types import LossContext, LossInputs, LossOutput

__all__ = ["KLLoss"]


@register("kl")
@dataclass(frozen=True)
class KLLoss:
    """Forward KL to the teacher's top-k and tail (no parameters)."""

    requirements = LossRequirements(teacher_topk=True)

    def problems(self) -> list[str]:
        """No parameters, no problems."""
        return []

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput:
        """``(Σ m KL_t, Σ m, metrics)`` of one micro-batch."""
        import torch

        from nemo_dcod.losses.common import checked, topk_terms, weighted_output
        from nemo_dcod.losses.divergences import topk_forward_kl

        inputs, mask = checked(inputs, self.requirements, ctx)
        per_token = topk_forward_kl(*topk_terms(inputs))
        return weighted_output(per_token, torch.ones_like(per_token), mask)
