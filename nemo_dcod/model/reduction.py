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

Weight statistics (ḡ, the centring mean) are reduced over the data-parallel x context-parallel
group per micro-batch: exact for any data-parallel size; across gradient-accumulation micro-batches
each uses its own statistics (the pure-math loss also accepts whole-step statistics from a
pre-pass, which would cost a second forward of every micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from nemo.lightning.megatron_parallel import MegatronLossReduction

from nemo_dcod.losses import LossContext, TokenLoss, reduce_metrics
from nemo_dcod.parallel.signals import TraceBatch, loss_from_logits

__all__ = ["DistillLossReduction"]

# The key NeMo's MegatronStrategy reads for the logged loss: [loss_sum, num_tokens].
_LOSS_KEY = "loss_sum_and_ub_size"


class DistillLossReduction(MegatronLossReduction):
    """NeMo loss reduction running a :class:`~nemo_dcod.losses.TokenLoss` on vocab-parallel logits.

    Args:
        loss: DisCorD or a baseline (``LossConfig.build()``).
        vocab_size: the tokenizer's real vocabulary; padded columns of the output layer are excluded.
        step_fn: returns the current optimizer step (drives DisCorD's λ schedule).
        total_steps: the run's number of optimizer steps.
        chunk_size: rows per chunk of the vocab-parallel op (``None``: one pass).
        validate: check every micro-batch's inputs (finite, ids in range).
    """

    def __init__(
        self,
        loss: TokenLoss,
        vocab_size: int,
        step_fn: Callable[[], int],
        total_steps: int,
        chunk_size: int | None = None,
        validate: bool = True,
    ) -> None:
        super().__init__()
        self.loss = loss
        self.vocab_size = vocab_size
        self.step_fn = step_fn
        self.total_steps = total_steps
        self.chunk_size = chunk_size
        self.validate = validate
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

        ctx = LossContext(
            step=int(self.step_fn()),
            total_steps=self.total_steps,
            dp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            validate=self.validate,
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
        mean = totals[0] / totals[1].clamp(min=1.0)
        self.last_loss = float(mean)
        return mean
