"""Baselines in the same per-token form as DisCorD: same data, same loop, one config field apart.

* ``sft``:    ℓ_t = -lq_t.
* ``dft``:    ℓ_t = -stopgrad(q_θ(y_t)) · lq_t. Wu et al., "On the Generalization of SFT: A
              Reinforcement Learning Perspective with Reward Rectification", arXiv 2508.05629.
              Needs a warmed-up student (from random init every q ≈ 1/V and it does not learn).
* ``iw_sft``: ℓ_t = -w_d · lq_t with one weight per document d,
              w_d = clip(exp(mean_{t∈d}(lq_t - lp_t)), w_min, w_max), stopgrad. Qin & Springenberg,
              "Supervised Fine Tuning on Curated Data is Reinforcement Learning (and can be
              improved)", arXiv 2507.12856. The mean is clipped in log space before ``exp``.
* ``kl``:     forward KL to the stored teacher top-k plus a tail bucket.
* ``todi``:   ToDi's sigmoid-gated forward/reverse KL over the same buckets, arXiv 2505.16297.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from nemo_dcod.losses.diagnostics import weight_sums
from nemo_dcod.losses.divergences import todi_topk, topk_forward_kl
from nemo_dcod.losses.types import (
    LossContext,
    LossInputs,
    LossOutput,
    LossRequirements,
    masked,
    sanitized,
    validate_inputs,
    validate_values,
)
from nemo_dcod.losses.weights import document_index, log_ratio, per_document_mean

__all__ = ["DFTLoss", "IWSFTLoss", "KLLoss", "SFTLoss", "ToDiLoss"]


def _checked(inputs: LossInputs, reqs: LossRequirements, ctx: LossContext) -> tuple[LossInputs, Tensor]:
    validate_inputs(inputs, reqs)
    if ctx.validate:
        validate_values(inputs, reqs)
    return sanitized(inputs), inputs.mask


def _output(per_token: Tensor, weights: Tensor, mask: Tensor) -> LossOutput:
    loss_sum = masked(weights * per_token, mask).sum()
    return loss_sum, mask.sum(), weight_sums(weights, mask)


def _topk_terms(inputs: LossInputs) -> tuple[Tensor, Tensor, Tensor]:
    assert inputs.student_topk_logprobs is not None and inputs.student_tail_logprobs is not None
    assert inputs.teacher_topk_logprobs is not None
    return inputs.student_topk_logprobs, inputs.student_tail_logprobs, inputs.teacher_topk_logprobs


@dataclass(frozen=True)
class SFTLoss:
    """Plain token cross-entropy on the traces."""

    requirements = LossRequirements()

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput:
        inputs, mask = _checked(inputs, self.requirements, ctx)
        lq = inputs.student_logprobs
        return _output(-lq, torch.ones_like(lq), mask)


@dataclass(frozen=True)
class DFTLoss:
    """Dynamic fine-tuning: CE scaled by the student's own (detached) token probability."""

    requirements = LossRequirements()

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput:
        inputs, mask = _checked(inputs, self.requirements, ctx)
        lq = inputs.student_logprobs
        weights = masked(lq.detach(), mask).exp()
        return _output(-lq, weights, mask)


@dataclass(frozen=True)
class IWSFTLoss:
    """Importance-weighted SFT with one clipped, length-normalised weight per trace.

    Attributes:
        weight_min: lower clip of the sequence weight (>= 0).
        weight_max: upper clip of the sequence weight (> weight_min).
    """

    weight_min: float = 0.0
    weight_max: float = 2.0
    requirements = LossRequirements(teacher_logprobs=True)

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput:
        inputs, mask = _checked(inputs, self.requirements, ctx)
        assert inputs.teacher_logprobs is not None
        lq = inputs.student_logprobs
        ratio = log_ratio(lq, inputs.teacher_logprobs, mask)
        docs = document_index(inputs.segment_ids, ratio.shape, ratio.device)
        mean_ratio = per_document_mean(ratio, mask, docs)
        low = math.log(self.weight_min) if self.weight_min > 0 else -math.inf
        weights = mean_ratio.clamp(low, math.log(self.weight_max)).exp()
        return _output(-lq, weights, mask)


@dataclass(frozen=True)
class KLLoss:
    """Forward KL to the stored teacher top-k, with a tail bucket (see ``divergences``)."""

    requirements = LossRequirements(teacher_topk=True)

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput:
        inputs, mask = _checked(inputs, self.requirements, ctx)
        per_token = topk_forward_kl(*_topk_terms(inputs))
        return _output(per_token, torch.ones_like(per_token), mask)


@dataclass(frozen=True)
class ToDiLoss:
    """ToDi over the stored teacher top-k and tail bucket.

    Attributes:
        beta: sharpness of the per-entry sigmoid gate.
    """

    beta: float = 1.0
    requirements = LossRequirements(teacher_topk=True)

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput:
        inputs, mask = _checked(inputs, self.requirements, ctx)
        per_token = todi_topk(*_topk_terms(inputs), beta=self.beta)
        return _output(per_token, torch.ones_like(per_token), mask)
