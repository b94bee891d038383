"""``todi``: ToDi's sigmoid-gated mix of forward and reverse KL over the stored top-k and tail.

Per entry v (the top-k ids and the tail bucket), a gate ``σ(β · (log p(v) - log q_θ(v)))`` weighs
forward KL where the teacher puts more mass and reverse KL where the student does
(:func:`~nemo_dcod.losses.divergences.todi_topk`). ToDi, arXiv 2505.16297.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nemo_dcod.losses.registry import LossRequirements, register

if TYPE_CHECKING:
    from nemo_dcod.losses.types import LossContext, LossInputs, LossOutput

__all__ = ["ToDiLoss"]


@register("todi")
@dataclass(frozen=True)
class ToDiLoss:
    """ToDi over the teacher's top-k and tail (see the module docstring)."""

    beta: float = 1.0
    """Sharpness of the per-entry sigmoid gate (> 0)."""
    requirements = LossRequirements(teacher_topk=True)

    def problems(self) -> list[str]:
        """β > 0."""
        return [] if self.beta > 0 else [f"beta={self.beta}: must be > 0."]

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput:
        """``(Σ m ToDi_t, Σ m, metrics)`` of one micro-batch."""
        import torch

        from nemo_dcod.losses.common import checked, topk_terms, weighted_output
        from nemo_dcod.losses.divergences import todi_topk

        inputs, mask = checked(inputs, self.requirements, ctx)
        per_token = todi_topk(*topk_terms(inputs), beta=self.beta)
        return weighted_output(per_token, torch.ones_like(per_token), mask)
