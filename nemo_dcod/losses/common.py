"""Steps every loss shares: check and clean the inputs, and sum weighted per-token terms.

Imported by a loss when it is called (the loss modules themselves import no torch; see
:mod:`nemo_dcod.losses.registry`).
"""

from __future__ import annotations

from torch import Tensor

from nemo_dcod.losses.diagnostics import weight_sums
from nemo_dcod.losses.registry import LossRequirements
from nemo_dcod.losses.types import (
    LossContext,
    LossInputs,
    LossOutput,
    masked,
    sanitized,
    validate_inputs,
    validate_values,
)

__all__ = ["checked", "topk_terms", "weighted_output"]


def checked(
    inputs: LossInputs, requirements: LossRequirements, ctx: LossContext
) -> tuple[LossInputs, Tensor]:
    """Shapes always checked, values with ``ctx.validate``; the inputs cleaned under the mask
    (:func:`~nemo_dcod.losses.types.sanitized`) and the ``[B, S]`` bool mask."""
    validate_inputs(inputs, requirements)
    if ctx.validate:
        validate_values(inputs, requirements)
    return sanitized(inputs), inputs.mask


def weighted_output(per_token: Tensor, weights: Tensor, mask: Tensor) -> LossOutput:
    """``(Σ m w ℓ, Σ m, weight diagnostics)`` for ``[B, S]`` terms ``ℓ`` and detached weights ``w``."""
    loss_sum = masked(weights * per_token, mask).sum()
    return loss_sum, mask.sum(), weight_sums(weights, mask)


def topk_terms(inputs: LossInputs) -> tuple[Tensor, Tensor, Tensor]:
    """(student top-k log-probs, student tail log-prob, teacher top-k log-probs) of a top-k loss."""
    assert inputs.student_topk_logprobs is not None and inputs.student_tail_logprobs is not None
    assert inputs.teacher_topk_logprobs is not None
    return inputs.student_topk_logprobs, inputs.student_tail_logprobs, inputs.teacher_topk_logprobs
