"""Our loss as NeMo's ``MegatronLossReduction``: logits of one micro-batch in, Megatron's per-token form out.

NeMo calls :meth:`DistillLossReduction.forward` on the last pipeline stage once per micro-batch with
the batch from :func:`~nemo_dcod.model.steps.trace_data_step` and the vocab-parallel logits from
:func:`~nemo_dcod.model.steps.logits_forward_step`. It returns ``(loss_sum, num_tokens, metrics)``:
with ``calculate_per_token_loss=True`` on the model config (the plug-in sets it), Megatron's schedule
sums ``num_tokens`` over micro-batches, ``finalize_model_grads`` all-reduces it over data-parallel
ranks and divides the gradients once, and DDP does not average: the loss is the mean over the global
count of loss tokens, for every layout. :meth:`reduce` turns the per-micro-batch sums into the value
that is logged (the global token-weighted mean) and keeps the DisCorD diagnostics of the step in
:attr:`last_metrics` for the metrics logger.

**Weight statistics** (DisCorD's ḡ and centring mean b) are global means over a batch. With
``stats="previous_step"`` (the default) every micro-batch of step t uses those of step t-1's whole
global batch (:attr:`DistillLossReduction.carried`, a :class:`~nemo_dcod.losses.carry.CarriedStats`:
each micro-batch's Δ is kept, and :meth:`~DistillLossReduction.reduce` measures b, then ḡ with that
same b, over all micro-batches and data-parallel x context-parallel ranks; the formula is in
:mod:`nemo_dcod.losses.carry`): a step's gradient then does not depend on its data-parallel size,
micro-batch size or number of micro-batches. The first step of a run has none to use and trains
with λ = 0; checkpoints carry them (:class:`~nemo_dcod.train.callbacks.CarryWeightStats`), so a
resumed run continues exactly. Non-finite statistics stop the run in :meth:`reduce`, before the
optimizer applies the step (:class:`~nemo_dcod.losses.carry.NonFiniteStatsError`).
``stats="micro_batch"`` reduces each micro-batch's own over the data-parallel group instead (exact
across data-parallel ranks, not across accumulation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from nemo.lightning.megatron_parallel import MegatronLossReduction

from nemo_dcod.losses import LossContext, TokenLoss, reduce_metrics
from nemo_dcod.losses.carry import CarriedStats
from nemo_dcod.parallel.loss_inputs import TraceBatch, loss_from_logits

__all__ = ["CarriedStats", "DistillLossReduction", "carried_stats"]

# The key NeMo's MegatronStrategy reads for the logged loss: [loss_sum, num_tokens].
_LOSS_KEY = "loss_sum_and_ub_size"


_CARRIED: dict[str, CarriedStats] = {}


def carried_stats(key: str) -> CarriedStats:
    """The :class:`~nemo_dcod.losses.carry.CarriedStats` of run ``key`` in this process (made on
    first use). NeMo builds one model per virtual-pipeline chunk (the later ones re-instantiated
    from the first's recorded arguments) and calls ``reduce`` on the first chunk's loss reduction
    while the last chunk's runs the loss: both must see the same statistics, so they live here,
    under a key that the re-instantiated models share."""
    return _CARRIED.setdefault(key, CarriedStats())


class DistillLossReduction(MegatronLossReduction):
    """NeMo loss reduction running a :class:`~nemo_dcod.losses.TokenLoss` on vocab-parallel logits.

    Args:
        loss: DisCorD or a baseline (:func:`~nemo_dcod.losses.registry.build_loss`).
        vocab_size: the tokenizer's real vocabulary; padded columns of the output layer are excluded.
        step_fn: returns the current optimizer step (drives DisCorD's λ schedule).
        total_steps: the run's number of optimizer steps.
        chunk_size: rows per chunk of the vocab-parallel op (``None``: one pass).
        validate: check every micro-batch's inputs (finite, ids in range).
        stats: ``previous_step`` or ``micro_batch`` (see the module docstring).
        carried: the run's carried statistics (shared with the validation reduction and every
            model chunk); None: a private one.
        update_stats: measure each step's statistics into ``carried`` (training); False: only
            read them (validation).
    """

    def __init__(
        self,
        loss: TokenLoss,
        vocab_size: int,
        step_fn: Callable[[], int],
        total_steps: int,
        chunk_size: int | None = None,
        validate: bool = True,
        stats: str = "previous_step",
        carried: CarriedStats | None = None,
        update_stats: bool = True,
    ) -> None:
        super().__init__()
        self.loss = loss
        self.vocab_size = vocab_size
        self.step_fn = step_fn
        self.total_steps = total_steps
        self.chunk_size = chunk_size
        self.validate = validate
        self.stats_mode = stats
        self.carried = carried if carried is not None else CarriedStats()
        self.update_stats = update_stats
        self.last_metrics: dict[str, float] = {}
        self.last_weight_hist: torch.Tensor | None = None
        self.last_loss: float | None = None

    def forward(
        self, batch: dict[str, torch.Tensor], forward_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss_sum, num_tokens, {"loss_sum_and_ub_size": ..., "metrics": ...})`` of one micro-batch.

        Args:
            batch: the micro-batch (``labels``, ``loss_mask``, teacher fields) on this rank.
            forward_out: ``[B, S, V/TP]`` logits of this tensor-parallel rank.
        """
        from megatron.core import parallel_state

        carry = self.stats_mode == "previous_step"
        ctx = LossContext(
            step=int(self.step_fn()),
            total_steps=self.total_steps,
            dp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            stats=self.carried.stats if carry else None,
            stats_pending=carry and not self.carried.ready,
            validate=self.validate,
            carry=self.carried if carry and self.update_stats else None,
        )
        trace_batch: TraceBatch = {k: v for k, v in batch.items() if v is not None}  # type: ignore[assignment]
        loss_sum, num_tokens, metrics = loss_from_logits(
            self.loss,
            forward_out,
            trace_batch,
            ctx,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            vocab_size=self.vocab_size,
            chunk_size=self.chunk_size,
        )
        loss_sum = loss_sum.float()
        num_tokens = num_tokens.detach().to(torch.int)
        logged = torch.stack([loss_sum.detach().clone(), num_tokens.float()])
        packed = {k: v.detach() for k, v in metrics.items()}
        return loss_sum, num_tokens, {_LOSS_KEY: logged, "metrics": packed}  # type: ignore[dict-item]

    def reduce(self, losses_reduced_per_micro_batch: Sequence[dict[str, Any]]) -> torch.Tensor:
        """The global token-weighted mean loss of the step; diagnostics go to :attr:`last_metrics`.

        Sums over this rank's micro-batches, then one all-reduce over the data-parallel group for
        the loss and one for the diagnostics' sums.
        """
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        if not losses_reduced_per_micro_batch:
            return torch.zeros(())
        totals = torch.stack([x[_LOSS_KEY].float() for x in losses_reduced_per_micro_batch]).sum(0)
        torch.distributed.all_reduce(totals, group=group)
        step = reduce_metrics([x["metrics"] for x in losses_reduced_per_micro_batch], group)
        self.last_metrics = {k: float(v) for k, v in step.items() if v.numel() == 1}
        self.last_weight_hist = step.get("weight_hist")
        if self.update_stats and self.stats_mode == "previous_step":
            # This step's global statistics (every micro-batch, every DP x CP rank), for the next
            # step: b, then ḡ and mean g² with that b (losses/carry.py). Raises on a non-finite one,
            # before the optimizer applies this step.
            self.carried.end_step(self.loss, group)
        mean = totals[0] / totals[1].clamp(min=1.0)
        self.last_loss = float(mean)
        return mean
