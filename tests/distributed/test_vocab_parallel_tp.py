"""Vocab-parallel ops under real tensor parallelism (gloo, TP = 1, 2, 4) vs the unsharded math.

Every rank holds a ``V/TP`` slice of the same float64 logits; the outputs (replicated) and the
concatenated shard gradients must equal a full-vocabulary ``log_softmax`` reference computed in
the parent process, to rel. 1e-9. One spawn per TP size runs every case.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers.dist_utils import run_distributed
from helpers.references import entropy, full_logprobs, tail_logprob

from nemo_dcod.losses import LossContext, build_loss
from nemo_dcod.parallel import vocab_parallel_logprobs, vocab_parallel_topk_forward_kl
from nemo_dcod.parallel.loss_inputs import loss_from_logits

pytestmark = pytest.mark.distributed

SEQ, BATCH, VOCAB, K = 6, 2, 24, 5
# (vocab_size, chunk_size): 17 of 24 real columns leaves TP=4's last rank with no real column.
CASES = [(VOCAB, None), (VOCAB, 4), (17, None), (17, 5)]


def _data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    logits = 2 * torch.randn(SEQ, BATCH, VOCAB, generator=gen, dtype=torch.float64)
    # Top-k ids spread over the whole real vocabulary, so every rank owns some of them.
    ids = torch.stack([torch.randperm(17, generator=gen)[: K + 1] for _ in range(SEQ * BATCH)]).reshape(
        SEQ, BATCH, K + 1
    )
    weights = torch.randn(SEQ, BATCH, K + 3, generator=gen, dtype=torch.float64)
    teacher = torch.log_softmax(torch.randn(SEQ, BATCH, 17, generator=gen, dtype=torch.float64), -1)
    return {"logits": logits, "ids": ids, "weights": weights, "teacher": teacher}


def _objective(lp: torch.Tensor, tail: torch.Tensor, ent: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (lp * w[..., : K + 1]).sum() + (tail * w[..., K + 1]).sum() + (ent * w[..., K + 2]).sum()


def _shard_worker(rank: int, world: int) -> dict[str, Any]:
    data = _data()
    group = dist.group.WORLD
    shard = VOCAB // world
    results: dict[str, Any] = {}
    for vocab_size, chunk in CASES:
        logits = data["logits"][..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
        out = vocab_parallel_logprobs(
            logits,
            data["ids"],
            group=group,
            vocab_size=vocab_size,
            with_tail=True,
            with_entropy=True,
            tail_from=1,
            chunk_size=chunk,
        )
        assert out.tail_logprobs is not None and out.entropy is not None
        _objective(out.logprobs, out.tail_logprobs, out.entropy, data["weights"]).backward()
        results[f"op/{vocab_size}/{chunk}"] = (out.logprobs, out.tail_logprobs, out.entropy, logits.grad)

        # The top-k forward KL wrapper (ids 1..K are the teacher's top-k).
        logits = logits.detach().requires_grad_()
        teacher_lp = data["teacher"].gather(-1, data["ids"][..., 1:])
        kl = vocab_parallel_topk_forward_kl(
            logits, data["ids"][..., 1:], teacher_lp, group=group, vocab_size=vocab_size, chunk_size=chunk
        )
        kl.sum().backward()
        results[f"kl/{vocab_size}/{chunk}"] = (kl.detach(), logits.grad)

    # A whole loss through the NeMo-facing helper: batch-first [B, S, V/TP].
    for name, params in (("discord", {"base": "kl", "tau": 0.7}), ("todi", {})):
        logits = (
            data["logits"].transpose(0, 1)[..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
        )
        batch = _batch(data)
        loss_sum, tokens, _ = loss_from_logits(
            build_loss(name, **params),
            logits,
            batch,
            LossContext(),
            tp_group=group,
            vocab_size=17,
            chunk_size=3,
        )
        (loss_sum / tokens).backward()
        results[f"loss/{name}"] = (loss_sum.detach(), logits.grad)
    return results


def _batch(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = data["ids"].transpose(0, 1)
    teacher = data["teacher"].transpose(0, 1)
    mask = torch.ones(BATCH, SEQ)
    mask[0, :2] = 0
    return {
        "labels": ids[..., 0],
        "loss_mask": mask,
        "teacher_logprobs": teacher.gather(-1, ids[..., :1])[..., 0],
        "teacher_topk_ids": ids[..., 1:],
        "teacher_topk_logprobs": teacher.gather(-1, ids[..., 1:]),
    }


def _reference(vocab_size: int) -> dict[str, Any]:
    data = _data()
    logits = data["logits"].clone().requires_grad_()
    lp = full_logprobs(logits, vocab_size)
    ids = data["ids"]
    values = (lp.gather(-1, ids), tail_logprob(lp, ids[..., 1:]), entropy(lp))
    _objective(*values, data["weights"]).backward()
    return {"values": [v.detach() for v in values], "grad": logits.grad}


def _reference_kl(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = _data()
    logits = data["logits"].clone().requires_grad_()
    lp = full_logprobs(logits, vocab_size)
    topk = data["ids"][..., 1:]
    p = data["teacher"].gather(-1, topk).exp()
    p_tail = 1 - p.sum(-1)
    kl = (p * (p.log() - lp.gather(-1, topk))).sum(-1) + p_tail * (p_tail.log() - tail_logprob(lp, topk))
    kl.sum().backward()
    return kl.detach(), logits.grad


def _reference_loss(name: str, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    data = _data()
    logits = data["logits"].transpose(0, 1).clone().requires_grad_()
    loss_sum, tokens, _ = loss_from_logits(
        build_loss(name, **params), logits[..., :17], _batch(data), LossContext()
    )
    (loss_sum / tokens).backward()
    grad = torch.zeros_like(logits)
    grad[..., :17] = logits.grad[..., :17]
    return loss_sum.detach(), grad


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_ops_equal_unsharded_values_and_gradients(tp: int) -> None:
    ranks = run_distributed(_shard_worker, tp)
    tol = {"rtol": 1e-9, "atol": 1e-12}
    for vocab_size, chunk in CASES:
        ref = _reference(vocab_size)
        for res in ranks:
            *values, _ = res[f"op/{vocab_size}/{chunk}"]
            for got, want in zip(values, ref["values"], strict=True):
                torch.testing.assert_close(got.detach(), want, **tol)  # replicated on every rank
        grad = torch.cat([res[f"op/{vocab_size}/{chunk}"][3] for res in ranks], dim=-1)
        torch.testing.assert_close(grad, ref["grad"], **tol)

        kl_ref, kl_grad_ref = _reference_kl(vocab_size)
        for res in ranks:
            torch.testing.assert_close(res[f"kl/{vocab_size}/{chunk}"][0], kl_ref, **tol)
        grad = torch.cat([res[f"kl/{vocab_size}/{chunk}"][1] for res in ranks], dim=-1)
        torch.testing.assert_close(grad, kl_grad_ref, **tol)

    for name, params in (("discord", {"base": "kl", "tau": 0.7}), ("todi", {})):
        loss_ref, grad_ref = _reference_loss(name, params)
        for res in ranks:
            torch.testing.assert_close(res[f"loss/{name}"][0], loss_ref, **tol)
        grad = torch.cat([res[f"loss/{name}"][1] for res in ranks], dim=-1)
        torch.testing.assert_close(grad, grad_ref, **tol)
