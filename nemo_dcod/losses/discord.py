"""DisCorD: distribution-corrected offline distillation.

Zhang, Yang, Goonatilake, Zhu, "Distribution Corrected Offline Data Distillation for Large Language
Models", arXiv 2605.14071 (2026). Our formulation of its public description (DESIGN.md §1):

    lq_t = log q_θ(y_t | x, y_<t)                    (vocab-parallel, fp32)
    lp_t = log p(y_t | x, y_<t)                      (stored offline)
    Δ_t  = clip(stopgrad(lq_t) - lp_t, -c, c)        (or its prefix / sequence variant)
    g_t  = sigmoid((Δ_t - b) / τ)                    (b = 0, or the global masked mean of Δ)
    w_t  = (1 - λ) + λ · g_t / ḡ                     (ḡ: global masked mean of g; λ scheduled)
    ℓ_t  = -lq_t                                      (base "ce")
         | KL_topk+tail(p_t || q_θ,t)                (base "kl")
    L    = Σ_t m_t w_t ℓ_t / N                        (N: global count of loss tokens)

Teacher tokens the student already supports (Δ high) keep their weight; tokens the student would
rarely produce itself are down-weighted, bounded below by 1 - λ, so training on the teacher's
prefixes leans towards the student's own distribution. Weights never carry gradient.

Global statistics. ``b`` and ``ḡ`` are means over the *global* batch. They are scalars fixed
before the backward: pass them in ``LossContext.stats`` (computed by :meth:`DisCorDLoss.weight_stats`
over all micro-batches of the step, or carried from the previous step), and the gradient is the
same for any split into data-parallel ranks and micro-batches. Without them the loss reduces its
own micro-batch's statistics over ``ctx.dp_group``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from nemo_dcod.losses.diagnostics import weight_sums
from nemo_dcod.losses.divergences import topk_forward_kl
from nemo_dcod.losses.types import (
    LossContext,
    LossInputs,
    LossOutput,
    LossRequirements,
    WeightStats,
    masked,
    sanitized,
    validate_inputs,
    validate_values,
)
from nemo_dcod.losses.weights import (
    LambdaSchedule,
    Variant,
    all_reduce_sum,
    document_index,
    log_ratio,
    per_document_mean,
    prefix_window_mean,
)

__all__ = ["DisCorDLoss"]


@dataclass(frozen=True)
class DisCorDLoss:
    """The DisCorD loss in Megatron's per-token form; see the module docstring for the formula.

    Attributes:
        variant: how Δ is formed: per ``token``, a causal ``prefix`` window, or per ``sequence``.
        base: the per-token loss the weights multiply: ``ce`` (-lq) or ``kl`` (top-k forward KL).
        tau: sigmoid temperature τ > 0 (small: sharp, mode-seeking; large: close to SFT).
        center: use b = global masked mean of Δ instead of b = 0.
        clip: c > 0, Δ is clipped to [-c, c].
        window: W, the prefix variant's window in tokens.
        schedule: λ over training (warm-up with λ = 0, then a linear ramp to λ_max).
    """

    variant: Variant = "token"
    base: Literal["ce", "kl"] = "ce"
    tau: float = 1.0
    center: bool = False
    clip: float = 10.0
    window: int = 16
    schedule: LambdaSchedule = field(default_factory=LambdaSchedule)

    @property
    def requirements(self) -> LossRequirements:
        return LossRequirements(teacher_logprobs=True, teacher_topk=self.base == "kl")

    def delta(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        """Δ of the configured variant and whether its raw value was clipped: both ``[B, S]``."""
        assert inputs.teacher_logprobs is not None
        mask = inputs.mask
        raw = log_ratio(inputs.student_logprobs, inputs.teacher_logprobs, mask)
        if self.variant == "sequence":
            docs = document_index(inputs.segment_ids, raw.shape, raw.device)
            raw = per_document_mean(raw, mask, docs)
            return masked(raw.clamp(-self.clip, self.clip), mask), raw.abs() > self.clip
        clipped = raw.abs() > self.clip
        delta = raw.clamp(-self.clip, self.clip)
        if self.variant == "prefix":
            docs = document_index(inputs.segment_ids, raw.shape, raw.device)
            delta = prefix_window_mean(delta, mask, docs, self.window)
        return masked(delta, mask), clipped

    def gate(self, delta: Tensor, stats: WeightStats) -> Tensor:
        """g = sigmoid((Δ - b) / τ), ``[B, S]``."""
        b = stats.delta_mean if self.center else 0.0
        return torch.sigmoid((delta - b) / self.tau)

    def weight_stats(self, micro_batches: list[LossInputs], group: ProcessGroup | None) -> WeightStats:
        """b and ḡ over all ``micro_batches`` of this rank and all ranks of ``group``.

        One all-reduce for (Σ m Δ, Σ m); a second for Σ m g once b is known. Call it on the step's
        micro-batches (a forward-only pre-pass) for statistics exact over the global batch.
        """
        deltas = [(self.delta(mb)[0], mb.mask) for mb in micro_batches]
        delta_sum, count = all_reduce_sum(
            [
                sum((masked(d, m).sum() for d, m in deltas), torch.zeros(())),
                sum((m.sum() for _, m in deltas), torch.zeros(())),
            ],
            group,
        )
        n = max(float(count), 1.0)
        provisional = WeightStats(delta_mean=float(delta_sum) / n, g_mean=1.0)
        (g_sum,) = all_reduce_sum(
            [sum((masked(self.gate(d, provisional), m).sum() for d, m in deltas), torch.zeros(()))],
            group,
        )
        g_mean = float(g_sum) / n if float(count) > 0 else 1.0
        return WeightStats(delta_mean=provisional.delta_mean, g_mean=g_mean)

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput:
        """``(Σ_t m_t w_t ℓ_t, Σ_t m_t, metrics)`` for one micro-batch."""
        reqs = self.requirements
        validate_inputs(inputs, reqs)
        if ctx.validate:
            validate_values(inputs, reqs)
        inputs = sanitized(inputs)
        mask = inputs.mask
        delta, clipped = self.delta(inputs)
        lam = self.schedule(ctx.step, ctx.total_steps)
        if ctx.stats is not None:
            stats = ctx.stats
        elif ctx.stats_pending:  # carried statistics, none yet: this step is plain SFT (see LossContext)
            stats, lam = WeightStats(delta_mean=0.0, g_mean=1.0), 0.0
        else:
            stats = self.weight_stats([inputs], ctx.dp_group)
        g = self.gate(delta, stats)
        g_mean = stats.g_mean if stats.g_mean > 0 else 1.0
        weights = ((1.0 - lam) + lam * g / g_mean).detach()

        if self.base == "ce":
            per_token = -inputs.student_logprobs
        else:
            assert inputs.student_topk_logprobs is not None and inputs.student_tail_logprobs is not None
            assert inputs.teacher_topk_logprobs is not None
            per_token = topk_forward_kl(
                inputs.student_topk_logprobs, inputs.student_tail_logprobs, inputs.teacher_topk_logprobs
            )
        loss_sum = masked(weights * per_token, mask).sum()
        metrics = weight_sums(weights, mask, delta=delta, clipped=clipped, g=g)
        metrics["lambda"] = torch.tensor(lam, dtype=torch.float64)
        return loss_sum, mask.sum(), metrics
