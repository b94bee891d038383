"""``dft``: dynamic fine-tuning, CE scaled by the student's own (detached) token probability.

    ℓ_t = -stopgrad(q_θ(y_t)) · lq_t

Wu et al., "On the Generalization of SFT: A Reinforcement Learning Perspective with Reward
Rectification", arXiv 2508.05629. Needs a warmed-up student: from a random initialisation every
q ≈ 1/V and it does not learn (FACTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nemo_dcod.losses.registry import LossRequirements, register

if TYPE_CHECKING:
    from nemo_dcod.losses.types import LossContext, LossInputs, LossOutput

__all__ = ["DFTLoss"]


@register("dft")
@dataclass(frozen=True)
class DFTLoss:
    """CE weighted by the detached student probability of the trace token (no parameters)."""

    requirements = LossRequirements()

    def problems(self) -> list[str]:
        """No parameters, no problems."""
        return []

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput:
        """``(Σ m w ℓ, Σ m, metrics)`` of one micro-batch, ``w = exp(stopgrad(lq))``."""
        from nemo_dcod.losses.common import checked, weighted_output
        from nemo_dcod.losses.types import masked

        inputs, mask = checked(inputs, self.requirements, ctx)
        lq = inputs.student_logprobs
        return weighted_output(-lq, masked(lq.detach(), mask).exp(), mask)
