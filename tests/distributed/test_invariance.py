"""The gradient of one global batch is the same however it is split across ranks and micro-batches.

Megatron's per-token contract: each micro-batch returns ``(loss_sum, num_tokens)``, gradients are
summed over micro-batches and data-parallel ranks and divided once by the global token count.
DisCorD's global statistics (b, ḡ) come from ``weight_stats`` over the step's micro-batches and
the data-parallel group. Layouts: DP=1 x 1 micro-batch (reference), DP=1 x 4, DP=2 x 1 (with and
without precomputed stats), DP=2 x 2, and TP=2 x DP=2 x 2 with a vocab-parallel output layer.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers.dist_utils import new_subgroups, run_distributed

from nemo_dcod.losses import LossContext, build_loss
from nemo_dcod.parallel.loss_inputs import loss_from_logits

pytestmark = pytest.mark.distributed

ROWS, SEQ, VOCAB, HIDDEN, K = 4, 12, 16, 8, 3
REAL_VOCAB = 14  # two padded columns

LOSSES: list[tuple[str, dict[str, Any]]] = [
    ("discord", {"variant": "token", "tau": 0.7}),
    ("discord", {"variant": "token", "center": True, "clip": 1.0, "base": "kl"}),
    ("discord", {"variant": "prefix", "window": 4, "center": True}),
    ("discord", {"variant": "sequence", "tau": 2.0, "lambda_max": 0.7, "lambda_ramp_fraction": 0.5}),
    ("iw_sft", {}),
    ("todi", {}),
]


def _global_batch() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    features = torch.randn(ROWS, SEQ, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64)
    teacher = torch.log_softmax(
        2 * torch.randn(ROWS, SEQ, REAL_VOCAB, generator=gen, dtype=torch.float64), -1
    )
    labels = torch.randint(0, REAL_VOCAB, (ROWS, SEQ), generator=gen)
    topk = teacher.topk(K, dim=-1).indices
    mask = (torch.rand(ROWS, SEQ, generator=gen) > 0.25).double()
    mask[:, 0] = 0
    mask[3] = 0  # a row without loss tokens
    segments = torch.zeros(ROWS, SEQ, dtype=torch.long)
    segments[:, 6:] = 1  # two packed documents per row
    batch = {
        "labels": labels,
        "loss_mask": mask,
        "teacher_logprobs": teacher.gather(-1, labels[..., None])[..., 0],
        "teacher_topk_ids": topk,
        "teacher_topk_logprobs": teacher.gather(-1, topk),
        "segment_ids": segments,
    }
    return features, batch, weight


def accumulated_grad(
    name: str,
    params: dict[str, Any],
    rows: list[int],
    micro_batches: int,
    *,
    tp_group: Any = None,
    dp_group: Any = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    precompute_stats: bool = True,
) -> torch.Tensor:
    """This rank's gradient of the output-layer shard, the way a Megatron schedule accumulates it."""
    features, batch, weight = _global_batch()
    shard = VOCAB // tp_size
    w = weight[tp_rank * shard : (tp_rank + 1) * shard].clone().requires_grad_()
    loss = build_loss(name, **params)
    per_mb = [rows[i::micro_batches] for i in range(micro_batches)]
    ctx = LossContext(step=3, total_steps=10, dp_group=dp_group)
    if precompute_stats and hasattr(loss, "weight_stats"):
        from nemo_dcod.parallel.loss_inputs import student_loss_inputs

        with torch.no_grad():  # the forward-only pre-pass over the step's micro-batches
            pre = [
                student_loss_inputs(
                    features[r] @ w.T,
                    {k: v[r] for k, v in batch.items()},  # type: ignore[misc]
                    loss.requirements,
                    tp_group=tp_group,
                    vocab_size=REAL_VOCAB,
                )
                for r in per_mb
            ]
        ctx.stats = loss.weight_stats(pre, dp_group)  # type: ignore[attr-defined]
    tokens = torch.zeros((), dtype=torch.float64)
    for r in per_mb:
        mb = {k: v[r] for k, v in batch.items()}
        loss_sum, num_tokens, _ = loss_from_logits(
            loss,
            features[r] @ w.T,
            mb,
            ctx,
            tp_group=tp_group,
            vocab_size=REAL_VOCAB,  # type: ignore[arg-type]
        )
        loss_sum.backward()
        tokens += num_tokens
    grad = w.grad
    assert grad is not None
    if dp_group is not None:
        dist.all_reduce(grad, group=dp_group)
        dist.all_reduce(tokens, group=dp_group)
    return grad / tokens


def _dp_worker(rank: int, world: int, micro_batches: int, precompute: bool) -> list[torch.Tensor]:
    rows = list(range(rank, ROWS, world))
    return [
        accumulated_grad(n, p, rows, micro_batches, dp_group=dist.group.WORLD, precompute_stats=precompute)
        for n, p in LOSSES
    ]


def _tp_dp_worker(rank: int, world: int) -> list[torch.Tensor]:
    tp_group, dp_group = new_subgroups(world, 2)
    dp_rank, tp_rank = divmod(rank, 2)
    rows = list(range(dp_rank, ROWS, 2))
    return [
        accumulated_grad(n, p, rows, 2, tp_group=tp_group, dp_group=dp_group, tp_rank=tp_rank, tp_size=2)
        for n, p in LOSSES
    ]


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor], layout: str) -> None:
    for (name, params), g, w in zip(LOSSES, got, want, strict=True):
        where = f"{layout} {name} {params}"
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-12, msg=lambda m, where=where: f"{where}: {m}")


def test_gradient_is_invariant_to_data_parallel_and_micro_batch_split() -> None:
    rows = list(range(ROWS))
    reference = [accumulated_grad(n, p, rows, 1, precompute_stats=False) for n, p in LOSSES]
    assert all(torch.count_nonzero(g) > 0 for g in reference)
    _assert_same([accumulated_grad(n, p, rows, 4) for n, p in LOSSES], reference, "DP=1 x 4 micro-batches")
    for micro_batches, precompute in ((1, False), (1, True), (2, True)):
        for rank_grads in run_distributed(_dp_worker, 2, micro_batches, precompute):
            _assert_same(rank_grads, reference, f"DP=2 x {micro_batches} (precomputed stats: {precompute})")
    ranks = run_distributed(_tp_dp_worker, 4)
    for dp_rank in range(2):
        shards = [ranks[2 * dp_rank + t] for t in range(2)]
        _assert_same(
            [torch.cat([s[i] for s in shards]) for i in range(len(LOSSES))], reference, "TP=2 x DP=2 x 2"
        )


def test_micro_batch_local_statistics_do_differ() -> None:
    """Without the pre-pass, statistics are per micro-batch: the check above could tell."""
    rows = list(range(ROWS))
    name, params = LOSSES[2]
    whole = accumulated_grad(name, params, rows, 1, precompute_stats=False)
    split = accumulated_grad(name, params, rows, 4, precompute_stats=False)
    assert not torch.allclose(whole, split, rtol=1e-6)
