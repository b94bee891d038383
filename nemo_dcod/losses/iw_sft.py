"""``iw_sft``: importance-weighted SFT with one clipped, length-normalised weight per trace.

    w_d = clip(exp(mean_{t∈d}(lq_t - lp_t)), w_min, w_max)   (stopgrad; one per document d)
    ℓ_t = -w_d · lq_t

Qin & Springenberg, "Supervised Fine Tuning on Curated Data is Reinforcement Learning (and can be
improved)", arXiv 2507.12856. The mean is clipped in log space before ``exp`` (never
exponentiating a sum over a long trace); the proposal ``lp`` is the teacher's, or the initial
student's (``score what=reference``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nemo_dcod.losses.registry import LossRequirements, register

if TYPE_CHECKING:
    from nemo_dcod.losses.types import LossContext, LossInputs, LossOutput

__all__ = ["IWSFTLoss"]


@register("iw_sft")
@dataclass(frozen=True)
class IWSFTLoss:
    """Importance-weighted SFT, one weight per trace (see the module docstring)."""

    weight_min: float = 0.0
    """Lower clip of the sequence weight (>= 0)."""
    weight_max: float = 2.0
    """Upper clip of the sequence weight (> weight_min)."""
    requirements = LossRequirements(teacher_logprobs=True, whole_documents=True)

    def problems(self) -> list[str]:
        """Clip bounds in order and non-negative."""
        if not 0 <= self.weight_min < self.weight_max:
            return [f"weight_min={self.weight_min}, weight_max={self.weight_max}: need 0 <= min < max."]
        return []

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput:
        """``(Σ m w_d ℓ, Σ m, metrics)`` of one micro-batch."""
        import math

        from nemo_dcod.losses.common import checked, weighted_output
        from nemo_dcod.losses.weights import document_index, log_ratio, per_document_mean

        inputs, mask = checked(inputs, self.requirements, ctx)
        assert inputs.teacher_logprobs is not None
        lq = inputs.student_logprobs
        ratio = log_ratio(lq, inputs.teacher_logprobs, mask)
        docs = document_index(inputs.segment_ids, ratio.shape, ratio.device)
        mean_ratio = per_document_mean(ratio, mask, docs)
        low = math.log(self.weight_min) if self.weight_min > 0 else -math.inf
        weights = mean_ratio.clamp(low, math.log(self.weight_max)).exp()
        return weighted_output(-lq, weights, mask)
