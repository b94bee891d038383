"""DisCorD's statistics carried from one optimizer step to the next (``loss.stats=previous_step``).

b and ḡ are means over a *global* batch, which a micro-batch cannot know before its backward.
Carried statistics use the previous step's instead: step t's weights are

    b_{t-1} = Σ m Δ / Σ m                                   over step t-1's global batch (0 without centring)
    ḡ_{t-1} = Σ m σ((Δ - b_{t-1}) / τ) / Σ m                over the same batch, with that same b
    w_t     = (1 - λ) + λ · σ((Δ_t - b_{t-1}) / τ) / ḡ_{t-1}

so ḡ is always measured with the b that the next step gates with, and on the batch it was measured
on the weights average exactly 1 (the gate mean and its normaliser agree). b_{t-1} is known only
once the whole step has been summed, so each micro-batch hands its ``[B, S]`` Δ to
:meth:`CarriedStats.keep` (4 bytes a token: 2 MB for a rank's share of a 512 x 8k global batch at
DP=8), and :meth:`CarriedStats.end_step` makes DisCorD's two reductions of
:meth:`~nemo_dcod.losses.discord.DisCorDLoss.deltas_stats` over the data-parallel (x context-
parallel) group: the statistics are those of ``weight_stats`` on the whole global batch, whatever
its split into ranks and micro-batches. A step's gradient therefore does not depend on the layout,
at the cost of two 2-element all-reduces per step.

Statistics that are not finite (a NaN Δ reached them: teacher log-probs or student logits gone bad,
with ``validate`` off) would make every later gate NaN: :meth:`CarriedStats.end_step` raises
:class:`NonFiniteStatsError`, naming the step and the statistic, before the optimizer applies that
step. The same check guards statistics restored from a checkpoint.

Used by both doors: the NeMo plug-in's :class:`~nemo_dcod.model.reduction.DistillLossReduction`
(one carrier per run, in checkpoints) and the plain Megatron ``loss_func``
(:func:`~nemo_dcod.model.megatron_loss.make_loss_func`'s ``carry``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from nemo_dcod.losses.types import WeightStats

if TYPE_CHECKING:
    from torch import Tensor
    from torch.distributed import ProcessGroup

__all__ = ["CarriedStats", "NonFiniteStatsError", "StatsSource", "check_finite_stats"]


class NonFiniteStatsError(FloatingPointError):
    """A carried DisCorD statistic is NaN or infinite: the run must stop before it is used."""


class StatsSource(Protocol):
    """What measures a step's statistics from its Δ (:class:`~nemo_dcod.losses.discord.DisCorDLoss`)."""

    def deltas_stats(
        self, deltas: list[tuple[Tensor, Tensor]], group: ProcessGroup | None
    ) -> WeightStats: ...


def check_finite_stats(stats: WeightStats, where: str) -> WeightStats:
    """``stats`` if every field is finite; else :class:`NonFiniteStatsError` naming ``where`` and
    the field."""
    for name in ("delta_mean", "g_mean", "g_sq_mean"):
        value = getattr(stats, name)
        if value is not None and not math.isfinite(value):
            label = {"delta_mean": "b (mean Δ)", "g_mean": "ḡ (mean gate)", "g_sq_mean": "mean g²"}[name]
            raise NonFiniteStatsError(
                f"DisCorD's carried statistic {label} = {value} {where}: it is not finite, and every "
                "later weight would be NaN, so the run stops here, before the optimizer applies this "
                "step. A non-finite Δ reached it: a NaN or infinite teacher log-prob on a loss token, "
                "or student logits that overflowed. Run with loss.validate=true to find the record "
                "(score refuses bad teacher values), lower the learning rate, and resume from the last "
                "checkpoint."
            )
    return stats


@dataclass
class CarriedStats:
    """The previous step's statistics, and the current step's Δ until it ends.

    Attributes:
        stats: the statistics the current step's weights use (measured on the previous step's
            global batch); None before a step has been measured: that step trains with λ = 0.
        step: the step whose Δ are being kept (None: none).
    """

    stats: WeightStats | None = None
    step: int | None = None
    _deltas: list[tuple[Tensor, Tensor]] = field(default_factory=list, repr=False)

    @property
    def ready(self) -> bool:
        """The current step has statistics to weigh with."""
        return self.stats is not None

    def keep(self, step: int, delta: Tensor, mask: Tensor) -> None:
        """Hold one micro-batch's ``[B, S]`` Δ and bool loss mask of ``step`` (detached) until it ends."""
        if self.step is not None and step != self.step and self._deltas:
            raise RuntimeError(
                f"Δ of step {step} handed in while step {self.step} has not ended: call end_step() "
                "after each optimizer step (make_loss_func does it when the step number changes)."
            )
        self.step = step
        self._deltas.append((delta.detach(), mask.detach()))

    def end_step(self, source: StatsSource, group: ProcessGroup | None) -> WeightStats | None:
        """Measure the ending step's global statistics from the Δ kept; they become :attr:`stats`.

        A collective over ``group`` when Δ were kept (every rank of the group keeps them: they all
        run the loss, on the last pipeline stage); nothing when none were.

        Raises:
            NonFiniteStatsError: a statistic is NaN or infinite (nothing is carried).
        """
        if not self._deltas:
            return self.stats
        deltas, step = self._deltas, self.step
        self._deltas, self.step = [], None
        measured = source.deltas_stats(deltas, group)
        self.stats = check_finite_stats(measured, f"measured on step {step}'s batch (0-based)")
        return self.stats

    def restore(self, stats: WeightStats | None, where: str) -> None:
        """Put statistics back (from a checkpoint), refusing non-finite ones; pending Δ are dropped."""
        self.stats = None if stats is None else check_finite_stats(stats, where)
        self._deltas, self.step = [], None
