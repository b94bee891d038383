"""Vocab-parallel log-probabilities, tail mass and entropy, with exact gradients.

Under tensor parallelism (Megatron's ``ColumnParallelLinear`` output layer) each rank holds the
logits of a contiguous slice of the vocabulary: rank ``r`` of ``TP`` owns the global ids
``[r * V/TP, (r + 1) * V/TP)``. Everything DisCorD and its baselines need from the student is a
handful of numbers per token, all of which can be computed without ever gathering the full
vocabulary:

* ``log q(v)`` at a few global ids per token (the trace token, or the teacher's top-k),
* ``log q(tail)``: the log of the student mass *outside* a set of ids (the top-k tail bucket),
* the entropy ``H(q)``.

Each needs the per-token log-partition function ``lse = m + log Σ_v exp(x_v - m)``, which is one
all-reduce(MAX) for the stabilising max ``m`` and one all-reduce(SUM) for the partial sums. A
logit at a global id comes from the rank that owns it (the others contribute zero to a SUM).

Gradients. The output of these collectives is *replicated* on every rank, and every rank runs the
same scalar loss on it. If autograd differentiated through ``all_reduce`` it would sum the
replicated upstream gradients and scale the result by TP. The backward here is written by hand
instead: with the (replicated) upstream gradients, each rank's gradient for its own shard is a
purely local expression of the softmax of that shard, so backward needs no communication at all:

    d log q(k) / d x_j      = 1[j = k] - q_j
    d log q(tail) / d x_j   = 1[j ∉ topk] q_j / q(tail) - q_j
    d H / d x_j             = -q_j (x_j - E_q[x])

Padded vocabulary. Megatron pads the vocabulary to a multiple of ``128 * TP``; logits of the
padding columns are garbage and must not enter the partition function. ``vocab_size`` (the
tokenizer's real size) excludes them: they are sliced away (no copy), and their gradient is zero.

Memory. Unchunked, the forward keeps the fp32 softmax of the shard for the backward (as
Megatron's ``vocab_parallel_cross_entropy`` does) and the backward turns it into the gradient in
place. With ``chunk_size`` the rows (tokens) are processed ``chunk_size`` at a time: only one
fp32 chunk is alive at once, nothing of size ``[N, V/TP]`` is saved, and the backward recomputes
each chunk's softmax from the saved ``lse``. Peak extra memory is then the gradient itself (in
the logits' dtype) plus one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

__all__ = [
    "VocabParallelOutput",
    "vocab_parallel_entropy",
    "vocab_parallel_logprobs",
    "vocab_parallel_target_logprobs",
    "vocab_parallel_topk_forward_kl",
]


@dataclass
class VocabParallelOutput:
    """What :func:`vocab_parallel_logprobs` returns; every tensor is replicated across TP ranks.

    Attributes:
        logprobs: ``[..., K]`` student log-probabilities at the requested global ids.
        tail_logprobs: ``[...]`` log of the student mass outside the requested ids, or None.
        entropy: ``[...]`` entropy of the student distribution (real vocabulary only), or None.
    """

    logprobs: Tensor
    tail_logprobs: Tensor | None
    entropy: Tensor | None


def _world(group: ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(tensor: Tensor, op: dist.ReduceOp.RedOpType, group: ProcessGroup | None) -> Tensor:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Log-probs are always computed in at least fp32; float64 stays float64 (tests).
    return torch.promote_types(dtype, torch.float32)


def _chunks(num_rows: int, chunk_size: int | None) -> list[slice]:
    step = num_rows if not chunk_size or chunk_size >= num_rows else chunk_size
    return [slice(start, min(start + step, num_rows)) for start in range(0, max(num_rows, 1), step)]


def _owned(ids: Tensor, vocab_start: int, num_valid: int) -> tuple[Tensor, Tensor]:
    """Local column of each global id and whether this rank owns it. ``ids``: ``[N, K]``."""
    local = ids - vocab_start
    owned = (local >= 0) & (local < num_valid)
    # Not-owned ids point at column 0 (or are dropped via ``owned``); never read unmasked.
    return torch.where(owned, local, torch.zeros_like(local)), owned


def _in_ids_mask(local: Tensor, owned: Tensor, num_valid: int) -> Tensor:
    """``[N, num_valid]`` bool: column is one of the row's owned ids.

    Not-owned ids are routed to an extra sink column that is then dropped, so a not-owned id can
    never mark (or unmark) a real column, whatever order ``scatter_`` writes duplicates in.
    """
    sink = torch.where(owned, local, torch.full_like(local, num_valid))
    mask = torch.zeros(local.shape[0], num_valid + 1, dtype=torch.bool, device=local.device)
    mask.scatter_(1, sink, True)
    return mask[:, :num_valid]


class _VocabParallelLogProbs(torch.autograd.Function):
    """Autograd function behind :func:`vocab_parallel_logprobs` (rows already flattened)."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,  # [N, V/TP]
        ids: Tensor,  # [N, K] global ids
        group: ProcessGroup | None,
        vocab_start: int,
        num_valid: int,
        with_tail: bool,
        with_entropy: bool,
        chunk_size: int | None,
        tail_from: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        num_rows = logits.shape[0]
        cdtype = _compute_dtype(logits.dtype)
        dev = logits.device
        valid = logits[:, :num_valid]  # a view: padding columns are never read
        local_ids, owned = _owned(ids, vocab_start, num_valid)
        chunked = chunk_size is not None and chunk_size < num_rows

        # The global max: exact in any dtype, so no fp32 copy is needed for it.
        if num_valid > 0:
            row_max = valid.amax(dim=1).to(cdtype)
        else:
            row_max = torch.full((num_rows,), float("-inf"), dtype=cdtype, device=dev)
        _all_reduce(row_max, dist.ReduceOp.MAX, group)

        # Per chunk: exp(x - m) in the compute dtype, its partial sums, the owned ids' logits.
        sum_exp = torch.empty(num_rows, dtype=cdtype, device=dev)
        sum_exp_shift = torch.empty(num_rows, dtype=cdtype, device=dev) if with_entropy else None
        sum_tail = torch.empty(num_rows, dtype=cdtype, device=dev) if with_tail else None
        picked = torch.empty(ids.shape, dtype=cdtype, device=dev)
        exp = None
        if num_valid == 0:  # every column of this rank is padding: it contributes nothing
            for buf in (sum_exp, sum_exp_shift, sum_tail, picked):
                if buf is not None:
                    buf.zero_()
            exp = None if chunked else torch.empty((num_rows, 0), dtype=cdtype, device=dev)
        for rows in _chunks(num_rows, chunk_size) if num_valid else []:
            shifted = _shifted(valid[rows], row_max[rows], cdtype)
            picked[rows] = torch.where(owned[rows], shifted.gather(1, local_ids[rows]), 0.0)
            if sum_exp_shift is None:
                exp = shifted.exp_()
            else:
                exp = shifted.exp()
                sum_exp_shift[rows] = (exp * shifted).sum(dim=1)  # Σ e^s s, s = x - m <= 0
            del shifted
            sum_exp[rows] = exp.sum(dim=1)
            if sum_tail is not None:
                in_ids = _in_ids_mask(local_ids[rows, tail_from:], owned[rows, tail_from:], num_valid)
                sum_tail[rows] = exp.masked_fill(in_ids, 0.0).sum(dim=1)
            if chunked:
                exp = None  # recomputed in backward

        _all_reduce(picked, dist.ReduceOp.SUM, group)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        log_z = sum_exp.log()
        logprobs = picked - log_z[:, None]
        empty = torch.empty(0, dtype=cdtype, device=dev)
        tail_logprobs, entropy = empty, empty
        if sum_tail is not None:
            _all_reduce(sum_tail, dist.ReduceOp.SUM, group)
            # If all the tail mass underflows, floor it (log 0 = -inf would poison a KL term).
            tail_logprobs = sum_tail.clamp_min(torch.finfo(cdtype).tiny).log() - log_z
        if sum_exp_shift is not None:
            _all_reduce(sum_exp_shift, dist.ReduceOp.SUM, group)
            entropy = log_z - sum_exp_shift / sum_exp  # H = log Z - E_q[x - m]

        ctx.vocab_start, ctx.num_valid, ctx.tail_from = vocab_start, num_valid, tail_from
        ctx.chunk_size = chunk_size if chunked else None
        ctx.logits_dtype, ctx.logits_shape = logits.dtype, logits.shape
        ctx.backward_done = False
        # Unchunked: keep the fp32 softmax for backward. Chunked: keep the caller's logits (free).
        probs_or_logits = exp.div_(sum_exp[:, None]) if exp is not None else logits
        ctx.save_for_backward(ids, row_max + log_z, probs_or_logits, tail_logprobs, entropy)
        ctx.mark_non_differentiable(ids)
        return logprobs, tail_logprobs, entropy

    @staticmethod
    def backward(
        ctx: Any,
        grad_logprobs: Tensor,  # [N, K]
        grad_tail: Tensor,  # [N], or empty when the tail was not requested
        grad_entropy: Tensor,  # [N], or empty when the entropy was not requested
    ) -> tuple[Tensor | None, ...]:
        if ctx.chunk_size is None:
            if ctx.backward_done:
                raise RuntimeError(
                    "vocab_parallel_logprobs: a second backward through one unchunked call; its saved "
                    "softmax becomes the gradient in place. Pass chunk_size=... to recompute instead."
                )
            ctx.backward_done = True
        ids, lse, probs_or_logits, tail_logprobs, entropy = ctx.saved_tensors
        num_valid, cdtype = ctx.num_valid, lse.dtype
        if num_valid == 0:
            return (torch.zeros(ctx.logits_shape, dtype=ctx.logits_dtype, device=lse.device),) + (None,) * 8
        local_ids, owned = _owned(ids, ctx.vocab_start, num_valid)
        grad_logprobs = grad_logprobs.to(cdtype)
        g_tail = grad_tail.to(cdtype) if grad_tail is not None and grad_tail.numel() else None
        g_ent = grad_entropy.to(cdtype) if grad_entropy is not None and grad_entropy.numel() else None
        terms = _GradTerms(
            local_ids=local_ids,
            owned=owned,
            g_owned=torch.where(owned, grad_logprobs, 0.0),
            row_coeff=-grad_logprobs.sum(dim=1) - (g_tail if g_tail is not None else 0.0),
            g_tail=g_tail,
            tail_prob=tail_logprobs.exp() if g_tail is not None else None,
            g_ent=g_ent,
            entropy=entropy if g_ent is not None else None,
            tail_from=ctx.tail_from,
        )

        if ctx.chunk_size is None:
            grad_valid = terms.apply(probs_or_logits, slice(None), num_valid)
            if num_valid == ctx.logits_shape[1]:
                return (grad_valid.to(ctx.logits_dtype),) + (None,) * 8
            grad = _padded_grad(ctx.logits_shape, ctx.logits_dtype, num_valid, grad_valid.device)
            grad[:, :num_valid] = grad_valid
            return (grad,) + (None,) * 8

        logits = probs_or_logits
        grad = _padded_grad(ctx.logits_shape, ctx.logits_dtype, num_valid, logits.device)
        for rows in _chunks(lse.shape[0], ctx.chunk_size):
            probs = _shifted(logits[rows, :num_valid], lse[rows], cdtype).exp_()
            grad[rows, :num_valid] = terms.apply(probs, rows, num_valid)
            del probs
        return (grad,) + (None,) * 8


def _shifted(block: Tensor, shift: Tensor, cdtype: torch.dtype) -> Tensor:
    """``block - shift[:, None]`` in ``cdtype``, in a fresh buffer, allocating it only once.

    A lower-precision block is converted (a new buffer) and shifted in place; a block already in
    ``cdtype`` is the caller's tensor, so the subtraction must not be in place.
    """
    if block.dtype == cdtype:
        return block - shift[:, None]
    return block.to(cdtype).sub_(shift[:, None])


def _padded_grad(shape: torch.Size, dtype: torch.dtype, num_valid: int, device: torch.device) -> Tensor:
    """An uninitialised gradient buffer whose padding columns (>= num_valid) alone are zeroed."""
    grad = torch.empty(shape, dtype=dtype, device=device)
    grad[:, num_valid:] = 0
    return grad


@dataclass
class _GradTerms:
    """Per-row coefficients of the shard gradient; see the formulas in the module docstring."""

    local_ids: Tensor  # [N, K] local column of each id (0 where not owned)
    owned: Tensor  # [N, K] bool
    g_owned: Tensor  # [N, K] upstream gradient of each owned id's log-prob, 0 elsewhere
    row_coeff: Tensor  # [N] -(Σ_k g_k + g_tail): every column loses q_j times this
    g_tail: Tensor | None  # [N]
    tail_prob: Tensor | None  # [N] q(tail), floored like the forward
    g_ent: Tensor | None  # [N]
    entropy: Tensor | None  # [N]
    tail_from: int  # ids[:, tail_from:] are the ones the tail excludes

    def apply(self, probs: Tensor, rows: slice, num_valid: int) -> Tensor:
        """Turn ``probs`` (``[n, num_valid]`` softmax of rows ``rows``) into their gradient, in place."""
        extra = None
        if self.g_ent is not None and self.entropy is not None:
            # -g_H q_j (x_j - E_q[x]) = -g_H (q_j log q_j + q_j H); xlogy keeps 0 log 0 = 0.
            extra = torch.xlogy(probs, probs).add_(probs * self.entropy[rows, None])
            extra.mul_(-self.g_ent[rows, None])
        if self.g_tail is not None and self.tail_prob is not None:
            k0 = self.tail_from
            in_ids = _in_ids_mask(self.local_ids[rows, k0:], self.owned[rows, k0:], num_valid)
            tail = probs.masked_fill(in_ids, 0.0).mul_((self.g_tail[rows] / self.tail_prob[rows])[:, None])
            extra = tail if extra is None else extra.add_(tail)
        grad = probs.mul_(self.row_coeff[rows, None])
        grad.scatter_add_(1, self.local_ids[rows], self.g_owned[rows])
        if extra is not None:
            grad.add_(extra)
        return grad


def _vocab_range(logits: Tensor, group: ProcessGroup | None, vocab_size: int | None) -> tuple[int, int]:
    rank, _ = _world(group)
    shard = logits.shape[-1]
    start = rank * shard
    if vocab_size is None:
        return start, shard
    return start, max(0, min(shard, vocab_size - start))


def _check_ids(name: str, ids: Tensor, vocab_size: int, mask: Tensor | None) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: token ids must be int32/int64, got dtype {ids.dtype}.")
    bad = (ids < 0) | (ids >= vocab_size)
    if mask is not None:
        bad &= mask.bool().unsqueeze(-1).expand_as(bad) if bad.dim() == mask.dim() + 1 else mask.bool()
    count = int(bad.sum())
    if count:
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}: {count} token id(s) outside the vocabulary [0, {vocab_size}); first at index "
            f"{first} with value {int(ids[first])}. Check that the data was tokenized with the model's "
            "tokenizer and that vocab_size is the tokenizer's real size."
        )


def vocab_parallel_logprobs(
    logits: Tensor,
    ids: Tensor,
    *,
    group: ProcessGroup | None = None,
    vocab_size: int | None = None,
    with_tail: bool = False,
    with_entropy: bool = False,
    tail_from: int = 0,
    chunk_size: int | None = None,
    mask: Tensor | None = None,
) -> VocabParallelOutput:
    """Student log-probs at global ids (plus, optionally, tail mass and entropy) from a vocab shard.

    Args:
        logits: ``[..., V/TP]`` this rank's logit shard (any float dtype; math in >= fp32). The
            leading dims are flattened to rows, e.g. ``[S, B]`` (Megatron) or ``[B, S]`` (NeMo).
        ids: ``[..., K]`` global vocabulary ids, replicated on every TP rank (owned by any rank).
        group: the tensor-parallel process group (None: no tensor parallelism).
        vocab_size: the tokenizer's real vocabulary size; padded columns at or beyond it are
            excluded from the softmax and get zero gradient. None: every column is real.
        with_tail: also return ``log(1 - Σ_{k >= tail_from} q(ids_k))``, computed as the log of the
            summed mass of the other columns (no cancellation). Those ids must be distinct in a row.
        tail_from: the tail excludes ``ids[..., tail_from:]`` only, so that the trace token (id 0)
            and the teacher's top-k (ids 1..K) can share one pass over the vocabulary.
        with_entropy: also return the entropy of ``q``.
        chunk_size: rows per chunk; with it no fp32 ``[N, V/TP]`` buffer is alive at once and the
            backward recomputes each chunk. None: one chunk, the softmax is kept for backward.
        mask: ``[...]`` optional; ids are range-checked only where it is nonzero.

    Returns:
        :class:`VocabParallelOutput` with fp32 (or fp64) tensors, replicated across the group.

    Raises:
        ValueError: on a shape mismatch or ids outside ``[0, vocab_size)``.
    """
    if ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"ids: shape {tuple(ids.shape)} does not match logits {tuple(logits.shape)}; expected "
            f"{tuple(logits.shape[:-1])} + (K,)."
        )
    _, tp = _world(group)
    full_vocab = logits.shape[-1] * tp
    if vocab_size is not None and not 0 < vocab_size <= full_vocab:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {full_vocab}] (= V/TP * TP).")
    if with_tail and not 0 <= tail_from < ids.shape[-1]:
        raise ValueError(f"tail_from={tail_from} must index into the last dim of ids ({ids.shape[-1]}).")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of rows, or None.")
    _check_ids("ids", ids, vocab_size or full_vocab, mask)
    vocab_start, num_valid = _vocab_range(logits, group, vocab_size)
    lead = logits.shape[:-1]
    logprobs, tail, entropy = _VocabParallelLogProbs.apply(
        logits.reshape(-1, logits.shape[-1]),
        ids.reshape(-1, ids.shape[-1]).long(),
        group,
        vocab_start,
        num_valid,
        with_tail,
        with_entropy,
        chunk_size,
        tail_from,
    )
    return VocabParallelOutput(
        logprobs=logprobs.reshape(*lead, ids.shape[-1]),
        tail_logprobs=tail.reshape(lead) if with_tail else None,
        entropy=entropy.reshape(lead) if with_entropy else None,
    )


def vocab_parallel_target_logprobs(
    logits: Tensor,
    target: Tensor,
    *,
    group: ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """``log q(target)`` per token: ``[..., V/TP]`` shard and ``[...]`` target ids -> ``[...]`` fp32.

    The log-prob twin of Megatron's ``vocab_parallel_cross_entropy`` (which returns its negative),
    with padded-vocabulary exclusion, optional chunking, and no in-place change of ``logits``.
    """
    out = vocab_parallel_logprobs(
        logits,
        target.unsqueeze(-1),
        group=group,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        mask=mask,
    )
    return out.logprobs.squeeze(-1)


def vocab_parallel_entropy(
    logits: Tensor,
    *,
    group: ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Entropy of the student distribution per token: ``[..., V/TP]`` shard -> ``[...]`` fp32."""
    ids = torch.zeros((*logits.shape[:-1], 1), dtype=torch.long, device=logits.device)
    out = vocab_parallel_logprobs(
        logits, ids, group=group, vocab_size=vocab_size, with_entropy=True, chunk_size=chunk_size
    )
    assert out.entropy is not None
    return out.entropy


def vocab_parallel_topk_forward_kl(
    logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    *,
    group: ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Forward KL from a stored teacher top-k to the student, with a tail bucket: ``[...]`` fp32.

        KL = Σ_k p_k (log p_k - log q_k) + p_tail (log p_tail - log q_tail),
        p_tail = 1 - Σ_k p_k,  q_tail = 1 - Σ_k q_k,

    i.e. the exact KL between the (K+1)-bucket coarsenings of p and q, a lower bound of the full
    KL that is tight when the teacher's top-k holds its mass. See :func:`topk_forward_kl`.

    Args:
        logits: ``[..., V/TP]`` student logit shard.
        teacher_ids: ``[..., K]`` the teacher's top-k global ids (distinct within a row).
        teacher_logprobs: ``[..., K]`` the teacher's log-probs at those ids.
    """
    from nemo_dcod.losses.divergences import topk_forward_kl

    out = vocab_parallel_logprobs(
        logits,
        teacher_ids,
        group=group,
        vocab_size=vocab_size,
        with_tail=True,
        chunk_size=chunk_size,
        mask=mask,
    )
    assert out.tail_logprobs is not None
    return topk_forward_kl(out.logprobs, out.tail_logprobs, teacher_logprobs)
