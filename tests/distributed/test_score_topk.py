"""The scoring math under real tensor parallelism (gloo, TP = 1, 2, 4) vs the unsharded float64 math.

Logits are quantised to halves, so many are tied, also across shards; 17 of the 24 columns are real
(TP=4's last rank holds only padding, with the largest logits of all). Every rank's
:func:`score_logits` must return the same columns as a full-vocabulary ``log_softmax`` over the
real columns: the label's log-prob (0 where the label is masked), and the top-k ordered by
decreasing log-prob, ties by increasing id, never a padded id. One spawn per TP size.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers.dist_utils import run_distributed

from nemo_dcod.score.core import score_logits, vocab_parallel_topk_ids

pytestmark = pytest.mark.distributed

BATCH, SEQ, VOCAB, REAL, K = 2, 5, 24, 17, 4


def _data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    logits = (2 * torch.randn(BATCH, SEQ, VOCAB, generator=gen, dtype=torch.float64)).round() / 2
    logits[..., REAL:] = 50.0  # padded columns: would win every top-k if they were candidates
    labels = torch.randint(0, REAL, (BATCH, SEQ), generator=gen)
    mask = torch.rand(BATCH, SEQ, generator=gen) > 0.3
    return {"logits": logits, "labels": labels, "mask": mask}


def _reference(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    logp = torch.log_softmax(data["logits"][..., :REAL], dim=-1)
    # Decreasing log-prob, ties by increasing id: a stable descending sort keeps id order in ties.
    order = logp.argsort(dim=-1, descending=True, stable=True)[..., :K]
    keep = data["mask"]
    return {
        "logprobs": torch.where(keep, logp.gather(-1, data["labels"][..., None])[..., 0], 0.0),
        "topk_ids": torch.where(keep[..., None], order, 0),
        "topk_logprobs": torch.where(keep[..., None], logp.gather(-1, order), 0.0),
        "ids_unmasked": order,
    }


def _worker(rank: int, world: int) -> dict[str, Any]:
    data = _data()
    shard = VOCAB // world
    logits = data["logits"][..., rank * shard : (rank + 1) * shard]
    group = dist.group.WORLD if world > 1 else None
    out = score_logits(logits, data["labels"], data["mask"], topk=K, group=group, vocab_size=REAL)
    ids = vocab_parallel_topk_ids(logits, K, group=group, vocab_size=REAL)
    with pytest.raises(ValueError, match="topk=18: must be in"):
        vocab_parallel_topk_ids(logits, REAL + 1, group=group, vocab_size=REAL)
    return {"out": out, "ids": ids}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_score_logits_equals_the_unsharded_math(tp: int) -> None:
    data = _data()
    reference = _reference(data)
    assert (reference["ids_unmasked"][..., :-1] != reference["ids_unmasked"][..., 1:]).all()
    ties = torch.log_softmax(data["logits"][..., :REAL], -1).sort(-1, descending=True).values[..., : K + 1]
    assert (ties[..., 1:] == ties[..., :-1]).any()  # the tie order is exercised
    for result in run_distributed(_worker, tp):
        out = result["out"]
        assert torch.equal(result["ids"], reference["ids_unmasked"])
        assert out.topk_ids is not None and out.topk_logprobs is not None
        assert torch.equal(out.topk_ids, reference["topk_ids"].to(torch.int32))
        assert out.logprobs.dtype == torch.float32
        torch.testing.assert_close(out.logprobs, reference["logprobs"].float(), rtol=0, atol=1e-6)
        torch.testing.assert_close(out.topk_logprobs, reference["topk_logprobs"].float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("levels", [2, 5, None, 0])
def test_topk_ids_with_wide_and_narrow_ties_equal_a_stable_sort(levels: int | None) -> None:
    """Shards wider than k + the tie margin: exact order with 2 or 5 distinct values (ties wider than
    the float top-k's candidates: the full-key path), with continuous values (the fast path), and
    with every logit +0.0 or -0.0 (equal values, different bits)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, 300, generator=gen)
    if levels == 0:
        logits = torch.where(logits > 0, 0.0, -0.0)
    elif levels is not None:
        logits = torch.randint(0, levels, logits.shape, generator=gen).float()
    for k in (1, 5, 16):
        reference = logits[..., :257].argsort(dim=-1, descending=True, stable=True)[..., :k]
        for chunk in (None, 17):
            ids = vocab_parallel_topk_ids(logits, k, vocab_size=257, chunk_size=chunk)
            assert torch.equal(ids, reference), (levels, k, chunk)
