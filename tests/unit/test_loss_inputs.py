"""From logits + batch to loss inputs: the batch-level checks of ``student_loss_inputs``."""

from __future__ import annotations

import pytest
import torch

from nemo_dcod.losses import LossContext, LossRequirements, build_loss
from nemo_dcod.parallel.loss_inputs import loss_from_logits, student_loss_inputs

B, S, V, K = 2, 5, 11, 3


def _batch() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, S, V, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(B, S, V, generator=gen, dtype=torch.float64), -1)
    labels = torch.randint(0, V, (B, S), generator=gen)
    topk = teacher.topk(K, -1).indices
    return logits, {
        "labels": labels,
        "loss_mask": torch.ones(B, S),
        "teacher_logprobs": teacher.gather(-1, labels[..., None])[..., 0],
        "teacher_topk_ids": topk,
        "teacher_topk_logprobs": teacher.gather(-1, topk),
    }


def test_one_pass_gives_target_topk_and_tail() -> None:
    logits, batch = _batch()
    inputs = student_loss_inputs(logits, batch, LossRequirements(teacher_logprobs=True, teacher_topk=True))
    lq = torch.log_softmax(logits.detach(), -1)
    torch.testing.assert_close(
        inputs.student_logprobs.detach(), lq.gather(-1, batch["labels"][..., None])[..., 0]
    )
    torch.testing.assert_close(
        inputs.student_topk_logprobs.detach(), lq.gather(-1, batch["teacher_topk_ids"])
    )
    tail = torch.log1p(-lq.gather(-1, batch["teacher_topk_ids"]).exp().sum(-1))
    torch.testing.assert_close(inputs.student_tail_logprobs.detach(), tail)


def test_topk_ids_out_of_range_or_repeated_are_errors() -> None:
    logits, batch = _batch()
    batch["teacher_topk_ids"] = batch["teacher_topk_ids"].clone()
    batch["teacher_topk_ids"][1, 3, 2] = V + 4
    with pytest.raises(
        ValueError, match=r"1 token id\(s\) outside the vocabulary \[0, 11\); first at index \(1, 3, 3\)"
    ):
        loss_from_logits(build_loss("kl"), logits, batch, LossContext())  # type: ignore[arg-type]
    logits, batch = _batch()
    batch["teacher_topk_ids"] = batch["teacher_topk_ids"].clone()
    batch["teacher_topk_ids"][0, 1, 1] = batch["teacher_topk_ids"][0, 1, 0]
    with pytest.raises(
        ValueError, match=r"teacher_topk_ids: 1 token\(s\) have repeated ids .* first at \(0, 1\)"
    ):
        loss_from_logits(build_loss("todi"), logits, batch, LossContext())  # type: ignore[arg-type]


def test_missing_fields_and_shape_errors() -> None:
    logits, batch = _batch()
    del batch["teacher_topk_ids"]
    with pytest.raises(ValueError, match="the batch has no teacher top-k"):
        loss_from_logits(build_loss("kl"), logits, batch, LossContext())  # type: ignore[arg-type]
    logits, batch = _batch()
    del batch["teacher_logprobs"]
    with pytest.raises(ValueError, match="the batch has no teacher log-probs"):
        loss_from_logits(build_loss("discord"), logits, batch, LossContext())  # type: ignore[arg-type]
    logits, batch = _batch()
    with pytest.raises(ValueError, match=r"logits: shape \(5, 2, 11\) does not match labels \(2, 5\)"):
        loss_from_logits(build_loss("sft"), logits.transpose(0, 1), batch, LossContext())  # type: ignore[arg-type]
