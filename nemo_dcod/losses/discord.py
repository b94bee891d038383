"""DisCorD: distribution-corrected offline distillation.

Zhang, Yang, Goonatilake, Zhu, "Distribution Corrected Offline Data Distillation for Large Language
Models", arXiv 2605.14071 (2026). Our formulation of its public description (DESIGN.md §1):

    lq_t = log q_θ(y_t | x, y_<t)                    (vocab-parallel, fp32)
    lp_t = log p(y_t | x, y_<t)                      (stored offline)
    Δ_t  = clip(stopgrad(lq_t) - lp_t, -c, c)        (or its prefix / sequence variant)
    g_t  = sigmoid((Δ_t - b) / τ)                    (b = 0, or the global masked mean of Δ)
    w_t  = min((1 - λ) + λ · g_t / ḡ, w_max)         (ḡ: global masked mean of g; λ scheduled;
                                                      w_max: an optional cap, off by default)
    ℓ_t  = -lq_t                                      (base "ce")
         | KL_topk+tail(p_t || q_θ,t)                (base "kl")
    L    = Σ_t m_t w_t ℓ_t / N                        (N: global count of loss tokens)

Teacher tokens the student already supports (Δ high) keep their weight; tokens the student would
rarely produce itself are down-weighted, bounded below by 1 - λ, so training on the teacher's
prefixes leans towards the student's own distribution. Weights never carry gradient.

Global statistics. ``b`` and ``ḡ`` are means over the *global* batch. They are scalars fixed
before the backward: pass them in ``LossContext.stats`` (computed by :meth:`DisCorDLoss.weight_stats`
over all micro-batches of the step, or carried from the previous step: ``stats=previous_step``, the
default of both the NeMo plug-in and the plain Megatron ``loss_func``; :mod:`nemo_dcod.losses.carry`
gives the formula: ḡ is measured with the very b the next step gates with), and the gradient is the
same for any split into data-parallel ranks and micro-batches. Without them the loss reduces its own
micro-batch's statistics over ``ctx.dp_group``. Δ's variants live in :mod:`nemo_dcod.losses.variants`.

Fused path (``fused=true``, the default): Δ, gate, weights and the diagnostics' sums come from one
pure function of :mod:`nemo_dcod.losses.weights` with λ, b and ḡ as device scalars (compiled on
GPUs into a few kernels, no host sync; eager on CPU), built from the same helpers as the
step-by-step path (``fused=false``), which the tests hold it equal to.

**The ESS guard** (``ess_floor``). A small τ makes the gate nearly binary: the tokens the student
predicts badly get weight ≈ 1 - λ, i.e. almost no gradient at λ = 1, and the student stops
learning them (FACTS.md's probe: NLL 0.18 -> 0.63 at τ = 0.5). With r = g/ḡ (mean 1 over the
statistics' batch), w = 1 + λ(r - 1), so the weights' effective sample size is exactly

    ESS_w(λ) = (Σw)² / (n Σw²) = 1 / (1 + λ² Var(r)),   Var(r) = 1/ESS_g - 1,  ESS_g = ḡ² / mean(g²)

and ``ess_floor = f > 0`` caps λ at the value where ESS_w equals the floor:
λ ≤ sqrt((1/f - 1) / Var(r)). It is a fallback toward SFT (λ = 0 is SFT) that acts only when the
weights degenerate, reads the same statistics as b and ḡ (the previous step's global batch by
default, carried in checkpoints; :class:`~nemo_dcod.losses.types.WeightStats`), so it does not
depend on the layout, and it is logged every step: ``lambda`` (used), ``lambda_scheduled`` and
``guard_scale`` (their ratio: < 1 when the guard acted), ``gate_ess``.

The module imports no torch until the loss runs (:mod:`nemo_dcod.losses.registry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nemo_dcod.losses.registry import LossRequirements, register
from nemo_dcod.losses.variants import VARIANTS, WHOLE_DOCUMENT_VARIANTS

if TYPE_CHECKING:
    from torch import Tensor
    from torch.distributed import ProcessGroup

    from nemo_dcod.losses.types import LossContext, LossInputs, LossOutput, WeightStats

__all__ = ["DisCorDLoss"]


@register("discord")
@dataclass(frozen=True)
class DisCorDLoss:
    """The DisCorD loss in Megatron's per-token form; see the module docstring for the formula."""

    variant: str = "token"
    """How Δ is formed: token | prefix (mean over a causal window of `window` tokens) | sequence (the
    trace's mean) | sum (the trace's sum) | centered (the token minus its trace's mean) | min (the
    trace's worst token), or a registered one (nemo_dcod.losses.variants)."""
    base: str = "ce"
    """The per-token loss the weights multiply: ce (-lq) | kl (top-k forward KL; needs score's top-k)."""
    tau: float = 1.0
    """Sigmoid temperature τ > 0 (small: sharp, mode-seeking; large: close to SFT). FACTS.md's probe
    found τ = 0.5 unstable at λ = 1."""
    center: bool = False
    """Centre Δ by its global masked mean (b) instead of b = 0."""
    clip: float = 10.0
    """Δ's raw log ratio is clipped to [-clip, clip]."""
    window: int = 16
    """prefix variant: the window W in tokens."""
    lambda_max: float = 1.0
    """Final λ in [0, 1]; 0 is SFT."""
    lambda_warmup_fraction: float = 0.0
    """Fraction of the steps with λ = 0 (a warm-up on plain SFT)."""
    lambda_ramp_fraction: float = 0.0
    """Fraction of the steps of the linear ramp to lambda_max after the warm-up."""
    stats: str = "previous_step"
    """Where b and ḡ (global means over a batch) come from in training: previous_step (the previous
    optimizer step's whole global batch, carried in checkpoints; a step's gradient does not depend
    on how its batch is split, the first step of a run has λ = 0) | micro_batch (each micro-batch's
    own, reduced over data-parallel ranks)."""
    w_max: float | None = None
    """An optional cap on each token's weight, w = min(w, w_max) (>= 1: the weights average 1);
    metrics.jsonl logs capped_fraction, the share of loss tokens it lowered; null: no cap."""
    ess_floor: float = 0.0
    """The ESS guard, a fallback toward SFT when the weights degenerate: > 0 caps λ so that the
    weights' effective sample size (Σw)²/(nΣw²) on the statistics' batch (the previous step's)
    stays >= ess_floor, λ <= sqrt((1/ess_floor - 1) / (1/ESS_gate - 1)); metrics.jsonl logs
    guard_scale (λ used / λ scheduled, < 1 when it acts); 0: off."""
    fused: bool = True
    """Compute Δ, gate, weights and diagnostics in one pure function with device scalars
    (torch.compile on GPUs: a few kernels instead of a chain of small ones and host syncs; eager on
    CPU; DCOD_COMPILE_WEIGHTS=0 never compiles); false: the step-by-step reference path."""

    @property
    def requirements(self) -> LossRequirements:
        """Teacher log-probs always; the top-k with the kl base; whole documents for windowed or
        per-document Δ."""
        return LossRequirements(
            teacher_logprobs=True,
            teacher_topk=self.base == "kl",
            whole_documents=self.variant in WHOLE_DOCUMENT_VARIANTS,
        )

    def problems(self) -> list[str]:
        """Every invalid parameter, naming it."""
        out = []
        if self.variant not in VARIANTS:
            out.append(f"variant={self.variant!r}: must be one of {', '.join(VARIANTS)}.")
        if self.base not in ("ce", "kl"):
            out.append(f"base={self.base!r}: must be ce or kl.")
        if self.stats not in ("previous_step", "micro_batch"):
            out.append(f"stats={self.stats!r}: must be previous_step or micro_batch.")
        if not self.tau > 0:
            out.append(f"tau={self.tau}: must be > 0.")
        if not self.clip > 0:
            out.append(f"clip={self.clip}: must be > 0.")
        if self.w_max is not None and not self.w_max >= 1:
            out.append(f"w_max={self.w_max}: must be >= 1 (the weights average 1), or null for no cap.")
        if not 0 <= self.ess_floor < 1:
            out.append(f"ess_floor={self.ess_floor}: must be in [0, 1) (0: no guard).")
        if self.window < 1:
            out.append(f"window={self.window}: must be >= 1 token.")
        if not 0 <= self.lambda_max <= 1:
            out.append(f"lambda_max={self.lambda_max}: must be in [0, 1].")
        if not 0 <= self.lambda_warmup_fraction < 1:
            out.append(f"lambda_warmup_fraction={self.lambda_warmup_fraction}: must be in [0, 1).")
        if not 0 <= self.lambda_ramp_fraction <= 1:
            out.append(f"lambda_ramp_fraction={self.lambda_ramp_fraction}: must be in [0, 1].")
        if self.lambda_warmup_fraction + self.lambda_ramp_fraction > 1:
            out.append(
                "lambda_warmup_fraction + lambda_ramp_fraction = "
                f"{self.lambda_warmup_fraction + self.lambda_ramp_fraction}: must be <= 1."
            )
        return out

    def lam(self, step: int, total_steps: int) -> float:
        """λ at ``step``: 0 during the warm-up, then a linear ramp to ``lambda_max``."""
        total = max(total_steps, 1)
        warm = self.lambda_warmup_fraction * total
        if step < warm:
            return 0.0
        ramp = self.lambda_ramp_fraction * total
        if ramp <= 0:
            return self.lambda_max
        return self.lambda_max * min(1.0, (step - warm + 1) / ramp)

    def guard(self, lam: Tensor, g_mean: Tensor, g_sq_mean: Tensor | None) -> Tensor:
        """λ after the ESS guard (see ``ess_floor``): ``lam`` itself when off or unmeasured.

        Args:
            lam: 0-dim float64 scheduled λ. g_mean: 0-dim ḡ. g_sq_mean: 0-dim mean of g² over the
                same batch, or None (not measured: no guard).
        """
        import torch

        if self.ess_floor <= 0 or g_sq_mean is None:
            return lam
        g_bar = torch.where(g_mean > 0, g_mean, torch.ones_like(g_mean))  # as the weights use it
        spread = g_sq_mean / (g_bar * g_bar) - 1.0  # Var(g / ḡ) = 1 / ESS_gate - 1
        cap = torch.sqrt((1.0 / self.ess_floor - 1.0) / spread.clamp_min(1e-30))
        return torch.where(spread > 0, torch.minimum(lam, cap.to(lam.dtype)), lam)

    def delta(self, inputs: LossInputs) -> tuple[Tensor, Tensor]:
        """Δ of the configured variant and whether its raw value was clipped: both ``[B, S]``."""
        from nemo_dcod.losses.weights import log_ratio

        assert inputs.teacher_logprobs is not None
        raw = log_ratio(inputs.student_logprobs, inputs.teacher_logprobs, inputs.mask)
        return VARIANTS[self.variant](self, raw, inputs)

    def gate(self, delta: Tensor, stats: WeightStats) -> Tensor:
        """g = sigmoid((Δ - b) / τ), ``[B, S]``."""
        from nemo_dcod.losses.weights import sigmoid_gate

        return sigmoid_gate(delta, stats.delta_mean if self.center else 0.0, self.tau)

    def weight_stats(self, micro_batches: list[LossInputs], group: ProcessGroup | None) -> WeightStats:
        """b, ḡ and the mean of g² over all ``micro_batches`` of this rank and all ranks of ``group``.

        Call it on the step's micro-batches (a forward-only pre-pass) for statistics exact over the
        global batch; :meth:`deltas_stats` does the reductions.
        """
        return self.deltas_stats([(self.delta(mb)[0], mb.mask) for mb in micro_batches], group)

    def deltas_stats(self, deltas: list[tuple[Tensor, Tensor]], group: ProcessGroup | None) -> WeightStats:
        """b, ḡ and the mean of g² of ``(Δ [B, S], bool mask [B, S])`` pairs on this rank and ``group``.

        b = Σ m Δ / Σ m (reported always, used by the gate only with centring), then ḡ and mean g²
        with g = sigmoid((Δ - b) / τ), the b just measured (0 without centring): one all-reduce for
        (Σ m Δ, Σ m) and one for (Σ m g, Σ m g²), in float64. No loss token anywhere: b = 0, ḡ = 1.
        """
        import torch

        from nemo_dcod.losses.types import WeightStats, masked
        from nemo_dcod.losses.weights import all_reduce_sum

        f64 = torch.float64
        device = deltas[0][0].device if deltas else torch.device("cpu")
        zero = torch.zeros((), dtype=f64, device=device)
        delta_sum, count = all_reduce_sum(
            [
                sum((masked(d.to(f64), m).sum() for d, m in deltas), zero),
                sum((m.sum().to(f64) for _, m in deltas), zero),
            ],
            group,
        )
        n = max(float(count), 1.0)
        b = float(delta_sum) / n
        gates = [(self.gate(d.to(f64), WeightStats(delta_mean=b, g_mean=1.0)), m) for d, m in deltas]
        g_sum, g_sq_sum = all_reduce_sum(
            [
                sum((masked(g, m).sum() for g, m in gates), zero),
                sum((masked(g * g, m).sum() for g, m in gates), zero),
            ],
            group,
        )
        if float(count) <= 0:
            return WeightStats(delta_mean=0.0, g_mean=1.0, g_sq_mean=1.0)
        return WeightStats(delta_mean=b, g_mean=float(g_sum) / n, g_sq_mean=float(g_sq_sum) / n)

    def __call__(self, inputs: LossInputs, ctx: LossContext) -> LossOutput:
        """``(Σ_t m_t w_t ℓ_t, Σ_t m_t, metrics)`` for one micro-batch."""
        import torch

        from nemo_dcod.losses.common import checked
        from nemo_dcod.losses.diagnostics import weight_sums
        from nemo_dcod.losses.types import WeightStats, masked
        from nemo_dcod.losses.weights import mix_weights

        inputs, mask = checked(inputs, self.requirements, ctx)
        if self.fused:
            return self._fused_call(inputs, mask, ctx)
        delta, clipped = self.delta(inputs)
        scheduled = self.lam(ctx.step, ctx.total_steps)
        if ctx.stats is not None:
            stats = ctx.stats
        elif ctx.stats_pending:  # carried statistics, none yet: plain SFT (see LossContext)
            stats = WeightStats(delta_mean=0.0, g_mean=1.0)
        else:
            stats = self.weight_stats([inputs], ctx.dp_group)
        if ctx.stats_pending:
            scheduled = 0.0
        f64 = torch.float64
        g_sq = None if stats.g_sq_mean is None else torch.tensor(stats.g_sq_mean, dtype=f64)
        lam = float(
            self.guard(torch.tensor(scheduled, dtype=f64), torch.tensor(stats.g_mean, dtype=f64), g_sq)
        )
        if ctx.carry is not None:
            ctx.carry.keep(ctx.step, delta, mask)
        g = self.gate(delta, stats)
        g_mean = stats.g_mean if stats.g_mean > 0 else 1.0
        uncapped = mix_weights(g, g_mean, lam).detach()
        weights = uncapped if self.w_max is None else uncapped.clamp(max=self.w_max)
        loss_sum = masked(weights * self._per_token(inputs), mask).sum()
        metrics = weight_sums(weights, mask, delta=delta, clipped=clipped, g=g, capped=uncapped > weights)
        metrics.update(self._lambda_metrics(torch.tensor(lam, dtype=f64), scheduled, g, mask))
        return loss_sum, mask.sum(), metrics

    def _lambda_metrics(self, lam: Tensor, scheduled: float, g: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """λ used, λ scheduled, the guard's ratio of the two (1: it did not act), and Σ m g² (float64)."""
        import torch

        from nemo_dcod.losses.types import masked

        f64 = torch.float64
        lam = lam.to(f64)
        sched = torch.tensor(scheduled, dtype=f64, device=lam.device)
        g64 = g.detach().to(f64)
        return {
            "lambda": lam,
            "lambda_scheduled": sched,
            "guard_scale": torch.where(sched > 0, lam / sched.clamp_min(1e-300), torch.ones_like(sched)),
            "g_sq_sum": masked(g64 * g64, mask).sum(),
        }

    def _per_token(self, inputs: LossInputs) -> Tensor:
        """ℓ_t of the base loss, ``[B, S]`` (carries the gradient)."""
        from nemo_dcod.losses.common import topk_terms
        from nemo_dcod.losses.divergences import topk_forward_kl

        if self.base == "ce":
            return -inputs.student_logprobs
        return topk_forward_kl(*topk_terms(inputs))

    def _fused_call(self, inputs: LossInputs, mask: Tensor, ctx: LossContext) -> LossOutput:
        """The step-by-step path's result from the fused chain (``inputs`` already sanitized)."""
        import torch

        from nemo_dcod.losses.types import WeightStats, masked
        from nemo_dcod.losses.weights import fused, token_weight_chain, weight_chain

        assert inputs.teacher_logprobs is not None
        lq = inputs.student_logprobs.detach()
        dev, dtype = lq.device, lq.dtype
        scheduled = 0.0 if ctx.stats_pending else self.lam(ctx.step, ctx.total_steps)

        def scalar(x: float, kind: torch.dtype = dtype) -> Tensor:
            return torch.tensor(x, dtype=kind, device=dev)

        f64 = torch.float64
        cap = scalar(math.inf if self.w_max is None else self.w_max)
        if ctx.stats is not None or ctx.stats_pending:
            stats = ctx.stats if ctx.stats is not None else WeightStats(delta_mean=0.0, g_mean=1.0)
            center, g_mean = scalar(stats.delta_mean if self.center else 0.0), scalar(stats.g_mean)
            g_sq = None if stats.g_sq_mean is None else scalar(stats.g_sq_mean, f64)
            lam = self.guard(scalar(scheduled, f64), scalar(stats.g_mean, f64), g_sq)
        if self.variant == "token" and (ctx.stats is not None or ctx.stats_pending):
            # The plug-in's default (carried statistics): one function from the log-probs on.
            weights, delta, g, sums = fused(token_weight_chain, dev)(
                lq, inputs.teacher_logprobs, mask, lam.to(dtype), center, g_mean, self.clip, self.tau, cap
            )
        else:
            delta, clipped = self.delta(inputs)
            if ctx.stats is None and not ctx.stats_pending:
                center, g_mean, g_sq_mean = self._device_stats(delta, mask, ctx)
                lam = self.guard(scalar(scheduled, f64), g_mean.to(f64), g_sq_mean)
            weights, g, sums = fused(weight_chain, dev)(
                delta, clipped, mask, lam.to(dtype), center, g_mean, self.tau, cap
            )
        if ctx.carry is not None:
            ctx.carry.keep(ctx.step, delta, mask)
        loss_sum = masked(weights * self._per_token(inputs), mask).sum()
        keys = ("tokens", "weight_sum", "weight_sq_sum", "delta_sum", "delta_sq_sum", "clipped_count")
        metrics = dict(zip((*keys, "g_sum", "capped_count", "weight_hist"), sums, strict=True))
        metrics.update(self._lambda_metrics(lam, scheduled, g, mask))
        return loss_sum, mask.sum(), metrics

    def _device_stats(self, delta: Tensor, mask: Tensor, ctx: LossContext) -> tuple[Tensor, Tensor, Tensor]:
        """b, ḡ (in Δ's dtype) and the mean of g² (float64) of this micro-batch over ``ctx.dp_group``
        as 0-dim device tensors, without a host sync; the values of :meth:`weight_stats` on ``[inputs]``."""
        import torch

        from nemo_dcod.losses.types import masked
        from nemo_dcod.losses.weights import all_reduce_sum, fused, gate_sum, sigmoid_gate

        delta_sum, count = all_reduce_sum([masked(delta, mask).sum(), mask.sum()], ctx.dp_group)
        n = count.clamp_min(1.0)
        center = (delta_sum / n if self.center else torch.zeros_like(n)).to(delta.dtype)
        g = sigmoid_gate(delta, center, self.tau).to(torch.float64)
        g_sum, g_sq_sum = all_reduce_sum(
            [fused(gate_sum, delta.device)(delta, mask, center, self.tau), masked(g * g, mask).sum()],
            ctx.dp_group,
        )
        g_mean = torch.where(count > 0, g_sum / n, torch.ones_like(g_sum))
        g_sq_mean = torch.where(count > 0, g_sq_sum / n, torch.ones_like(g_sq_sum))
        return center, g_mean.to(delta.dtype), g_sq_mean
