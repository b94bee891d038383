"""Our loss as a plain Megatron ``loss_func``, for Megatron-LM and Megatron-Bridge training loops.

Megatron's ``forward_step`` returns the model output and a ``loss_func`` that the pipeline schedule
calls on the last stage. Call the ``GPTModel`` **without labels** so that it returns the
vocab-parallel logits, batch-first ``[B, S, V/TP]`` (megatron-core 0.15.3 transposes its
``[S, B, V/TP]`` output before returning), and bind the micro-batch with :func:`make_loss_func`::

    carry = CarriedStats()  # once per run: DisCorD's previous-step statistics (loss.stats)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)  # tokens, position_ids, labels, loss_mask, teacher_* fields
        logits = model(batch["tokens"], batch["position_ids"], None)  # no labels: [B, S, V/TP]
        return logits, make_loss_func(
            loss, batch, step=args.curr_iteration, total_steps=args.train_iters,
            vocab_size=tokenizer.vocab_size,  # the real size; padded columns are excluded
            carry=carry, training=model.training,  # evaluation reads the statistics, adds nothing
        )

**DisCorD's statistics** follow ``loss.stats``. With ``previous_step`` (the default) pass one
:class:`~nemo_dcod.losses.carry.CarriedStats` for the whole run as ``carry``: every micro-batch's Δ
is kept in it, and the first :func:`make_loss_func` call of the next step (a new ``step`` value)
measures the ended step's global b and ḡ over the data-parallel x context-parallel group (two small
all-reduces; every rank of a stage calls ``forward_step`` at the same point of the schedule) and
weighs the new step with them, as the NeMo plug-in does; the first step trains with λ = 0. Put
``carry.stats`` (a :class:`~nemo_dcod.losses.types.WeightStats`) into your checkpoint and back with
``carry.restore(...)`` to resume exactly. Without ``carry`` DisCorD needs ``loss.stats=micro_batch``
(each micro-batch's own, reduced over data-parallel ranks) or explicit ``stats`` from a pre-pass.

``config.calculate_per_token_loss=True`` is required (Megatron-LM: ``--calculate-per-token-loss``;
:func:`make_loss_func` returns the per-token 3-tuple whatever it is set to). With it the schedule
leaves ``loss_sum`` alone and adds up ``num_tokens`` over micro-batches; ``finalize_model_grads``
all-reduces that count over the data-parallel x context-parallel group and divides the gradients
by it once, and DDP sums instead of averaging: the gradient is that of the mean over the *global*
count of loss tokens, for any layout. Without it the schedule divides each micro-batch's sum by its
own token count and by the number of micro-batches, and DDP averages over ranks: a mean of means,
which weights a token of a short micro-batch more than one of a long one and changes with the layout.

Under context parallelism, give the loss the batch sliced like the logits (Megatron's
``get_batch_on_this_cp_rank``); the ``token`` variant of DisCorD and the top-k losses are local per
token, whereas ``prefix`` / ``sequence`` / ``iw_sft`` need whole documents on one rank: they are
refused when context parallelism is on, and refuse a batch without ``segment_ids``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.distributed import ProcessGroup

from nemo_dcod.losses import LossContext, TokenLoss, WeightStats
from nemo_dcod.losses.carry import CarriedStats
from nemo_dcod.parallel.loss_inputs import TraceBatch, loss_from_logits

__all__ = ["MegatronLossFunc", "make_loss_func", "megatron_metrics"]

MegatronLossFunc = Callable[[Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]
"""``loss_func(output_tensor) -> (loss_sum, num_tokens, logged)``, Megatron's per-token form."""


def megatron_metrics(loss_sum: Tensor, num_tokens: Tensor, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    """The dict a Megatron ``loss_func`` returns for logging, from one micro-batch's local sums.

    Megatron-LM's ``train_step`` (and Megatron-Bridge's) sums a 2-element value ``[s, n]`` over
    micro-batches and data-parallel ranks and logs ``s / n``; a 1-element value is averaged over
    micro-batches; any other size raises. So ``lm loss`` is ``[loss_sum, num_tokens]`` (the global
    token-weighted mean), each diagnostic sum ``x_sum`` / ``x_count`` becomes ``x_mean`` /
    ``x_fraction`` = ``[x_sum, num_tokens]``, scalars (``lambda``) stay scalars, and the weight
    histogram is left out. ESS is ``weight_mean² / weight_sq_mean``. All values are float64.
    """
    tokens = num_tokens.detach().to(torch.float64)
    out = {"lm loss": torch.stack([loss_sum.detach().to(torch.float64), tokens])}
    for key, value in metrics.items():
        value = value.detach().to(device=tokens.device, dtype=torch.float64)
        if key.endswith(("_sum", "_count")):
            name = key.removesuffix("_sum").removesuffix("_count")
            name += "_fraction" if key.endswith("_count") else "_mean"
            out[f"dcod {name}"] = torch.stack([value.reshape(()), tokens])
        elif key != "tokens" and value.numel() == 1:
            out[f"dcod {key}"] = value.reshape(1)
    return out


def _groups(
    loss: TokenLoss, tp_group: ProcessGroup | None, dp_group: ProcessGroup | None, cp_size: int | None
) -> tuple[ProcessGroup | None, ProcessGroup | None]:
    """The TP and DP x CP groups (Megatron's ``parallel_state`` for those not given); refuses a
    whole-document loss under context parallelism."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if tp_group is None:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        if dp_group is None:
            dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        if cp_size is None:
            cp_size = parallel_state.get_context_parallel_world_size()
    if (cp_size or 1) > 1 and loss.requirements.whole_documents:
        raise ValueError(
            f"{type(loss).__name__}: forms Δ over whole documents, which context parallelism "
            f"(size {cp_size}) splits over ranks. Use DisCorD's token variant (or a top-k loss) with "
            "context parallelism, or train this loss with context_parallel_size=1."
        )
    return tp_group, dp_group


def _context(
    loss: TokenLoss,
    step: int,
    total_steps: int,
    dp_group: ProcessGroup | None,
    stats: WeightStats | None,
    carry: CarriedStats | None,
    training: bool,
    validate: bool,
) -> LossContext:
    """The micro-batch's :class:`LossContext`; with carried statistics, the previous step's (a new
    ``step`` first ends the one whose Δ ``carry`` holds)."""
    carried = getattr(loss, "stats", None) == "previous_step" and stats is None
    if carried and carry is None:
        raise ValueError(
            f"{type(loss).__name__} has stats='previous_step' (the default): pass carry=CarriedStats() "
            "(from nemo_dcod.losses.carry; one object for the whole run, kept across steps) so the "
            "previous step's global statistics weigh this one, or build the loss with "
            "stats='micro_batch', or pass this step's statistics as stats=... from a pre-pass."
        )
    if carried and carry is not None and training and carry.step is not None and carry.step != step:
        carry.end_step(loss, dp_group)  # DisCorD: measures the ended step from its Δ
    return LossContext(
        step=step,
        total_steps=total_steps,
        dp_group=dp_group,
        stats=carry.stats if carried and carry is not None else stats,
        stats_pending=carried and carry is not None and not carry.ready,
        validate=validate,
        carry=carry if carried and training else None,
    )


def make_loss_func(
    loss: TokenLoss,
    batch: TraceBatch,
    *,
    step: int,
    total_steps: int,
    vocab_size: int,
    chunk_size: int | None = None,
    validate: bool = True,
    tp_group: ProcessGroup | None = None,
    dp_group: ProcessGroup | None = None,
    stats: WeightStats | None = None,
    carry: CarriedStats | None = None,
    training: bool = True,
    cp_size: int | None = None,
) -> MegatronLossFunc:
    """The ``loss_func`` of one micro-batch, for ``forward_step`` to return next to the logits.

    Args:
        loss: DisCorD or a baseline (``build_loss(...)``).
        batch: this micro-batch on this rank: ``labels`` / ``loss_mask`` ``[B, S]`` and the teacher
            fields the loss reads (``teacher_logprobs`` ``[B, S]``, ``teacher_topk_ids`` /
            ``teacher_topk_logprobs`` ``[B, S, K]``), on the logits' device.
        step: the current optimizer step, 0-based (drives DisCorD's λ schedule).
        total_steps: the run's number of optimizer steps.
        vocab_size: the tokenizer's real vocabulary size (the output layer's padding is excluded).
        chunk_size: rows per chunk of the vocab-parallel log-prob op; None: one pass.
        validate: check the loss tokens' inputs (ids in range, finite, log-probs <= 0); one sync.
        tp_group: the tensor-parallel group the logits' vocabulary is split over. None: Megatron's
            ``parallel_state`` group, or a single rank when model parallelism is not initialised.
        dp_group: the group DisCorD's weight statistics are reduced over. None: ``parallel_state``'s
            data-parallel group with context parallelism (ranks holding other tokens of the batch).
        stats: DisCorD statistics of the whole global batch (from ``DisCorDLoss.weight_stats`` on a
            forward-only pre-pass). None: from ``carry`` (``loss.stats=previous_step``) or each
            micro-batch's own, reduced over ``dp_group`` (``loss.stats=micro_batch``: exact for any
            data-parallel size, per micro-batch under gradient accumulation).
        carry: the run's :class:`~nemo_dcod.losses.carry.CarriedStats` (one object for the whole
            run, see the module docstring); required by DisCorD with ``stats=previous_step``
            unless ``stats`` is given.
        training: False in evaluation (pass ``model.training``): ``carry``'s statistics are read,
            nothing is measured into them.
        cp_size: the context-parallel size. None: ``parallel_state``'s (1 when not initialised).

    Returns:
        ``loss_func(output_tensor)``: ``output_tensor`` is the ``[B, S, V/TP]`` logits; it returns
        ``(loss_sum, num_tokens, logged)``: the fp32 scalar sum over this micro-batch's loss tokens
        (not divided: ``calculate_per_token_loss=True``), their count as an int32 scalar, and the
        logging dict of :func:`megatron_metrics`.
    """
    tp_group, dp_group = _groups(loss, tp_group, dp_group, cp_size)
    ctx = _context(loss, step, total_steps, dp_group, stats, carry, training, validate)

    def loss_func(output_tensor: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        loss_sum, num_tokens, metrics = loss_from_logits(
            loss, output_tensor, batch, ctx, tp_group=tp_group, vocab_size=vocab_size, chunk_size=chunk_size
        )
        # int32 because the schedule accumulates into `torch.zeros([], dtype=torch.int)`.
        num_tokens = num_tokens.detach().to(torch.int)
        return loss_sum.float(), num_tokens, megatron_metrics(loss_sum, num_tokens, metrics)

    return loss_func
