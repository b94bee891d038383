"""The loss contract: what a loss receives, what it returns, and how inputs are checked.

Every loss in this package is a callable ``loss(inputs, ctx) -> (loss_sum, num_tokens, metrics)``,
Megatron's per-token form: the schedule sums ``loss_sum`` and ``num_tokens`` over micro-batches
and data-parallel ranks and divides once, so the mean is over the *global* count of loss tokens
whatever the layout. Inputs are batch-first ``[B, S]`` (what Megatron-core's and NeMo's
``GPTModel`` return when called without labels), sequence on dim 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from nemo_dcod.losses.registry import LossRequirements

if TYPE_CHECKING:
    from nemo_dcod.losses.carry import CarriedStats

__all__ = ["LossContext", "LossInputs", "LossOutput", "LossRequirements", "TokenLoss", "WeightStats"]

LossOutput = tuple[Tensor, Tensor, dict[str, Tensor]]
"""``(loss_sum, num_tokens, metrics)``: a scalar sum over this micro-batch's loss tokens, their
count, and scalar diagnostics (local sums, so that they can be summed across ranks)."""

# Stored log-probs are rounded; anything above this is not a log-probability.
POSITIVE_LOGPROB_TOLERANCE = 1e-4


@dataclass
class LossInputs:
    """Per-token quantities of one micro-batch. Every ``[B, S]`` tensor is aligned to the label.

    Attributes:
        student_logprobs: ``[B, S]`` log q_θ(y_t | y_<t) of the trace token; carries gradient.
        loss_mask: ``[B, S]`` 1 on response tokens that are trained, 0 on prompt/padding/the first
            token of a packed document.
        teacher_logprobs: ``[B, S]`` log p(y_t | y_<t) of the proposal (teacher or initial student).
        student_topk_logprobs: ``[B, S, K]`` log q_θ at the teacher's top-k ids.
        student_tail_logprobs: ``[B, S]`` log q_θ of the mass outside the teacher's top-k.
        teacher_topk_logprobs: ``[B, S, K]`` log p at the teacher's top-k ids.
        segment_ids: ``[B, S]`` document index of each token in packed rows (equal ids = one
            document, changes mark boundaries). None: every row is one document.
    """

    student_logprobs: Tensor
    loss_mask: Tensor
    teacher_logprobs: Tensor | None = None
    student_topk_logprobs: Tensor | None = None
    student_tail_logprobs: Tensor | None = None
    teacher_topk_logprobs: Tensor | None = None
    segment_ids: Tensor | None = None

    @property
    def mask(self) -> Tensor:
        """``[B, S]`` bool loss mask."""
        return self.loss_mask.bool()


@dataclass(frozen=True)
class WeightStats:
    """Global statistics that DisCorD's weights are normalised by, fixed before a step's backward.

    Attributes:
        delta_mean: the global masked mean of Δ (the centring ``b``); only read when centring.
        g_mean: the global masked mean of g = sigmoid((Δ - b)/τ), i.e. ḡ.
        g_sq_mean: the global masked mean of g²: with ḡ, the gate's effective sample size
            ḡ² / mean(g²), which DisCorD's ESS guard (``ess_floor``) reads; None: not measured
            (the guard then leaves λ alone).
    """

    delta_mean: float
    g_mean: float
    g_sq_mean: float | None = None


@dataclass
class LossContext:
    """Everything a loss needs besides the tensors.

    Attributes:
        step: the optimizer step (0-based) this micro-batch belongs to; drives the λ schedule.
        total_steps: the run's number of optimizer steps.
        dp_group: the data-parallel (x context-parallel) group for global statistics; None: one rank.
        stats: DisCorD weight statistics of the whole global batch (from a pre-pass over its
            micro-batches, see ``DisCorDLoss.weight_stats``, or the previous step's). None: they
            are computed on this micro-batch and reduced over ``dp_group``, which is exact for any
            data-parallel size but not across gradient-accumulation micro-batches.
        stats_pending: the statistics are carried from step to step and none exist yet (the first
            step of a run): the weights are 1 (λ = 0) for this step, whatever the schedule says,
            so that no step depends on how its batch is split.
        validate: check inputs (finite, in range); costs a device sync per micro-batch.
        carry: where a loss that carries statistics from step to step hands this micro-batch's Δ
            (:meth:`~nemo_dcod.losses.carry.CarriedStats.keep`), to measure the step's statistics
            when it ends; None: nothing is kept (validation, explicit or per-micro-batch statistics).
    """

    step: int = 0
    total_steps: int = 1
    dp_group: ProcessGroup | None = None
    stats: WeightStats | None = None
    stats_pending: bool = False
    validate: bool = True
    carry: CarriedStats | None = None


class TokenLoss(Protocol):
    """A loss in Megatron's per-token form."""

    @property
    def requirements(self) -> LossRequirements: ...

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput: ...


def _first_bad(name: str, bad: Tensor, values: Tensor, problem: str, fix: str) -> None:
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}: {count} value(s) {problem} on loss tokens; first at index {first} = "
            f"{float(values[first])!r}. {fix}"
        )


def _check_shape(name: str, tensor: Tensor | None, shape: torch.Size) -> None:
    if tensor is not None and tensor.shape != shape:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match {tuple(shape)}.")


def validate_inputs(inputs: LossInputs, requirements: LossRequirements) -> None:
    """Check shapes always; values of loss tokens (finite, log-probs <= 0) with ``validate``.

    Raises:
        ValueError: naming the tensor, the shape, or the count and first position of bad values.
    """
    shape = inputs.student_logprobs.shape
    if len(shape) != 2:
        raise ValueError(f"student_logprobs: expected [B, S], got shape {tuple(shape)}.")
    _check_shape("loss_mask", inputs.loss_mask, shape)
    _check_shape("teacher_logprobs", inputs.teacher_logprobs, shape)
    _check_shape("student_tail_logprobs", inputs.student_tail_logprobs, shape)
    _check_shape("segment_ids", inputs.segment_ids, shape)
    if requirements.whole_documents and inputs.segment_ids is None:
        raise ValueError(
            "segment_ids: this loss forms Δ over whole documents (DisCorD's prefix/sequence/sum/"
            "centered/min variants, iw_sft) and needs each token's document index [B, S] (the packed "
            "store's segment_ids; zeros for a row of one document). Without them a packed row would "
            "be taken for one document."
        )
    if requirements.teacher_logprobs and inputs.teacher_logprobs is None:
        raise ValueError("teacher_logprobs: this loss needs the stored teacher log-probs (run `score`).")
    if requirements.teacher_topk:
        topk = (inputs.student_topk_logprobs, inputs.student_tail_logprobs, inputs.teacher_topk_logprobs)
        if any(t is None for t in topk):
            raise ValueError(
                "teacher_topk_logprobs: this loss needs the teacher's top-k (score with topk > 0) and "
                "the student's log-probs at those ids and tail."
            )
        assert inputs.student_topk_logprobs is not None and inputs.teacher_topk_logprobs is not None
        if inputs.teacher_topk_logprobs.shape != inputs.student_topk_logprobs.shape or (
            inputs.teacher_topk_logprobs.shape[:2] != shape
        ):
            raise ValueError(
                f"teacher_topk_logprobs: shape {tuple(inputs.teacher_topk_logprobs.shape)} must equal "
                f"student_topk_logprobs {tuple(inputs.student_topk_logprobs.shape)} = [B, S, K] with "
                f"[B, S] = {tuple(shape)}."
            )


def validate_values(inputs: LossInputs, requirements: LossRequirements) -> None:
    """Value checks on loss tokens only (masked positions may hold anything, NaN included)."""
    mask = inputs.mask
    fix = "Re-run `score` or check the generation engine's output for this record."
    _first_bad(
        "student_logprobs",
        mask & ~torch.isfinite(inputs.student_logprobs.detach()),
        inputs.student_logprobs.detach(),
        "are not finite",
        "The student's logits overflowed: lower the learning rate or check the checkpoint.",
    )
    if requirements.teacher_logprobs and inputs.teacher_logprobs is not None:
        lp = inputs.teacher_logprobs
        _first_bad("teacher_logprobs", mask & ~torch.isfinite(lp), lp, "are NaN or ±inf", fix)
        _first_bad("teacher_logprobs", mask & (lp > POSITIVE_LOGPROB_TOLERANCE), lp, "are positive", fix)
    if requirements.teacher_topk and inputs.teacher_topk_logprobs is not None:
        lp = inputs.teacher_topk_logprobs
        kmask = mask.unsqueeze(-1).expand_as(lp)
        _first_bad("teacher_topk_logprobs", kmask & ~torch.isfinite(lp), lp, "are NaN or ±inf", fix)
        _first_bad(
            "teacher_topk_logprobs", kmask & (lp > POSITIVE_LOGPROB_TOLERANCE), lp, "are positive", fix
        )
        mass = lp.exp().sum(-1)
        _first_bad(
            "teacher_topk_logprobs",
            mask & (mass > 1.0 + 1e-3),
            mass,
            "sum to a probability above 1",
            "Top-k ids must be distinct and their log-probs normalised over the full vocabulary.",
        )


def sanitized(inputs: LossInputs) -> LossInputs:
    """A copy whose non-loss positions hold harmless finite log-probs instead of whatever was there.

    Zeroing a loss term with ``where`` is not enough when the term itself was computed from a NaN
    or inf (``inf * 0`` in its backward is NaN): the inputs are cleaned before any math, so
    garbage under the mask (padding, prompts, ``-inf`` from an engine) never reaches a gradient.
    """
    mask = inputs.mask

    def clean(t: Tensor | None, value: float) -> Tensor | None:
        if t is None:
            return None
        m = mask if t.dim() == mask.dim() else mask.unsqueeze(-1)
        return torch.where(m, t, torch.full((), value, dtype=t.dtype, device=t.device))

    k = inputs.teacher_topk_logprobs.shape[-1] if inputs.teacher_topk_logprobs is not None else 1
    return LossInputs(
        student_logprobs=clean(inputs.student_logprobs, -1.0),  # type: ignore[arg-type]
        loss_mask=inputs.loss_mask,
        teacher_logprobs=clean(inputs.teacher_logprobs, -1.0),
        student_topk_logprobs=clean(inputs.student_topk_logprobs, -1.0),
        student_tail_logprobs=clean(inputs.student_tail_logprobs, -1.0),
        teacher_topk_logprobs=clean(inputs.teacher_topk_logprobs, -math.log(2.0 * k)),
        segment_ids=inputs.segment_ids,
    )


def masked(values: Tensor, mask: Tensor) -> Tensor:
    """``values`` where ``mask``, else 0. Unlike ``values * mask`` a NaN or inf under the mask can't
    leak into the sum or the gradient (``where``'s backward sends exactly 0 to masked positions)."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
