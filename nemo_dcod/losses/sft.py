"""``sft``: plain token cross-entropy on the teacher's traces.

ℓ_t = -lq_t,      L = Σ_t m_t ℓ_t / N
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nemo_dcod.losses.registry import LossRequirements, register

if TYPE_CHECKING:
    from nemo_dcod.losses.types import LossContext, LossInputs, LossOutput

__all__ = ["SFTLoss"]


@register("sft")
@dataclass(frozen=True)
class SFTLoss:
    """Plain token cross-entropy on the traces (no parameters)."""

    requirements = LossRequirements()

    def problems(self) -> list[str]:
        """No parameters, no problems."""
        return []

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput:
        """``(Σ m ℓ, Σ m, metrics)`` of one micro-batch."""
        import torch

        from nemo_dcod.losses.common import checked, weighted_output

        inputs, mask = checked(inputs, self.requirements, ctx)
        lq = inputs.student_logprobs
        return weighted_output(-lq, torch.ones_like(lq), mask)
