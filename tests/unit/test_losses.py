"""Every loss and variant against a token-by-token float64 reference (tests/helpers/references.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers.references import discord_weights, documents, tail_logprob

from nemo_dcod.losses import LossContext, LossInputs, build_loss, reduce_metrics
from nemo_dcod.losses.registry import BUILTIN, loss_problems

LOSS_NAMES = tuple(BUILTIN)

B, S, V, K = 3, 10, 12, 4


def make_inputs(seed: int = 0, packed: bool = True) -> tuple[LossInputs, torch.Tensor]:
    """Consistent student/teacher signals from full distributions; returns (inputs, student leaf)."""
    gen = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(B, S, V, generator=gen, dtype=torch.float64).requires_grad_()
    teacher = torch.log_softmax(2 * torch.randn(B, S, V, generator=gen, dtype=torch.float64), -1)
    labels = torch.randint(0, V, (B, S), generator=gen)
    topk_ids = teacher.topk(K, dim=-1).indices
    lq = torch.log_softmax(student_logits, -1)
    mask = torch.ones(B, S)
    mask[0, :3] = 0  # a prompt
    mask[1, 5] = 0  # the first token of a second packed document
    mask[2] = 0  # a row with no response token
    segments = torch.zeros(B, S, dtype=torch.long)
    if packed:
        segments[1, 5:] = 1
        segments[0, 7:] = 3
    inputs = LossInputs(
        student_logprobs=lq.gather(-1, labels[..., None])[..., 0],
        loss_mask=mask,
        teacher_logprobs=teacher.gather(-1, labels[..., None])[..., 0],
        student_topk_logprobs=lq.gather(-1, topk_ids),
        student_tail_logprobs=tail_logprob(lq, topk_ids),
        teacher_topk_logprobs=teacher.gather(-1, topk_ids),
        segment_ids=segments,
    )
    return inputs, student_logits


def _kl_ref(inputs: LossInputs, b: int, t: int) -> torch.Tensor:
    lp = inputs.teacher_topk_logprobs[b, t]
    lq = inputs.student_topk_logprobs[b, t]
    p_tail = 1 - lp.exp().sum()
    return (lp.exp() * (lp - lq)).sum() + p_tail * (p_tail.log() - inputs.student_tail_logprobs[b, t])


def _todi_ref(inputs: LossInputs, b: int, t: int, beta: float) -> torch.Tensor:
    lp = inputs.teacher_topk_logprobs[b, t].tolist()
    lp.append(math.log(1 - sum(math.exp(x) for x in lp)))
    lq = [*inputs.student_topk_logprobs[b, t], inputs.student_tail_logprobs[b, t]]
    total = torch.zeros((), dtype=torch.float64)
    for lpv, lqv in zip(lp, lq, strict=True):
        alpha = 1 / (1 + math.exp(-beta * (lpv - float(lqv))))
        total = total + alpha * math.exp(lpv) * (lpv - lqv) + (1 - alpha) * lqv.exp() * (lqv - lpv)
    return total


def reference_loss_sum(name: str, params: dict[str, Any], inputs: LossInputs, lam: float) -> torch.Tensor:
    lq, lp, mask = inputs.student_logprobs, inputs.teacher_logprobs, inputs.loss_mask.bool()
    total = torch.zeros((), dtype=torch.float64)
    if name == "discord":
        p = {
            "variant": "token",
            "tau": 1.0,
            "center": False,
            "clip": 10.0,
            "window": 16,
            "base": "ce",
        } | params
        p.pop("schedule", None)
        base = p.pop("base")
        w = discord_weights(lq.detach(), lp, mask, inputs.segment_ids, lam=lam, **p)
    elif name == "iw_sft":
        w = torch.zeros(B, S, dtype=torch.float64)
        lo, hi = params.get("weight_min", 0.0), params.get("weight_max", 2.0)
        for b in range(B):
            for doc in documents(inputs.segment_ids, b, S):
                toks = [t for t in doc if mask[b, t]]
                if toks:
                    mean = sum(float(lq[b, t] - lp[b, t]) for t in toks) / len(toks)
                    for t in toks:
                        w[b, t] = min(max(math.exp(mean), lo), hi)
    for b in range(B):
        for t in range(S):
            if not mask[b, t]:
                continue
            if name == "sft":
                total = total - lq[b, t]
            elif name == "dft":
                total = total - math.exp(float(lq[b, t].detach())) * lq[b, t]
            elif name == "iw_sft":
                total = total - w[b, t] * lq[b, t]
            elif name == "kl":
                total = total + _kl_ref(inputs, b, t)
            elif name == "todi":
                total = total + _todi_ref(inputs, b, t, params.get("beta", 1.0))
            elif base == "ce":
                total = total - w[b, t] * lq[b, t]
            else:
                total = total + w[b, t] * _kl_ref(inputs, b, t)
    return total


CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("sft", {}),
    ("dft", {}),
    ("iw_sft", {}),
    ("iw_sft", {"weight_min": 0.5, "weight_max": 1.5}),
    ("kl", {}),
    ("todi", {}),
    ("todi", {"beta": 3.0}),
    *[
        ("discord", {"variant": v, "base": base, "tau": tau, "center": center, "clip": clip, "window": 3})
        for v in ("token", "prefix", "sequence")
        for base in ("ce", "kl")
        for tau, center, clip in ((1.0, False, 10.0), (0.5, True, 1.5))
    ],
]


@pytest.mark.parametrize(("name", "params"), CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_loss_matches_reference_values_and_gradients(name: str, params: dict[str, Any]) -> None:
    schedule = {"lambda_max": 0.8, "lambda_warmup_fraction": 0.1, "lambda_ramp_fraction": 0.5}
    loss = build_loss(name, **(params | (schedule if name == "discord" else {})))
    step, total = 4, 10
    lam = build_loss("discord", **schedule).lam(step, total)
    assert lam == pytest.approx(0.8 * 4 / 5)
    inputs, leaf = make_inputs()
    loss_sum, num_tokens, metrics = loss(inputs, LossContext(step=step, total_steps=total))
    assert int(num_tokens) == int(inputs.loss_mask.sum()) == metrics["tokens"]
    (grad,) = torch.autograd.grad(loss_sum, leaf)

    ref_inputs, ref_leaf = make_inputs()
    ref = reference_loss_sum(name, params, ref_inputs, lam)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf)
    torch.testing.assert_close(loss_sum, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert torch.all(grad[2] == 0), "a row without loss tokens contributes nothing"


def test_discord_at_lambda_zero_is_sft_and_weights_average_to_one() -> None:
    inputs, _ = make_inputs(seed=2)
    ctx = LossContext()
    sft_sum, _, _ = build_loss("sft")(inputs, ctx)
    off = build_loss("discord", lambda_max=0.0)(inputs, ctx)
    torch.testing.assert_close(off[0], sft_sum)
    on_sum, tokens, metrics = build_loss("discord", tau=0.5)(inputs, ctx)
    full = reduce_metrics([metrics])
    assert float(full["weight_mean"]) == pytest.approx(1.0, rel=1e-12)  # w = g / ḡ
    assert 0 < float(full["ess"]) <= 1
    assert float(full["lambda"]) == 1.0
    assert full["weight_hist"].sum() == tokens
    assert not torch.allclose(on_sum, sft_sum)


def test_diagnostics_reduce_over_micro_batches_like_one_batch() -> None:
    inputs, _ = make_inputs(seed=4)
    loss = build_loss("discord", clip=0.5, tau=2.0, center=True)
    whole = loss(inputs, LossContext())[2]
    stats = loss.weight_stats([inputs], None)  # type: ignore[attr-defined]
    parts = []
    for rows in (slice(0, 1), slice(1, 3)):
        part = LossInputs(**{k: (v[rows] if v is not None else None) for k, v in vars(inputs).items()})
        parts.append(loss(part, LossContext(stats=stats))[2])
    merged, single = reduce_metrics(parts), reduce_metrics([whole])
    for key in ("ess", "clip_fraction", "delta_mean", "delta_std", "g_mean", "weight_hist"):
        torch.testing.assert_close(merged[key], single[key], rtol=1e-12, atol=1e-12)
    assert 0 < float(single["clip_fraction"]) < 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0.5])
def test_bad_teacher_logprobs_on_loss_tokens_raise(bad: float) -> None:
    inputs, _ = make_inputs()
    inputs.teacher_logprobs = inputs.teacher_logprobs.clone()
    inputs.teacher_logprobs[1, 7] = bad
    inputs.teacher_logprobs[1, 8] = bad
    problem = "are positive" if bad == 0.5 else "are NaN or ±inf"
    for name in ("discord", "iw_sft"):
        with pytest.raises(
            ValueError, match=rf"teacher_logprobs: 2 value\(s\) {problem} .* first at index \(1, 7\)"
        ):
            build_loss(name)(inputs, LossContext())


@pytest.mark.parametrize("name", ["kl", "todi"])
def test_bad_topk_logprobs_raise(name: str) -> None:
    inputs, _ = make_inputs()
    inputs.teacher_topk_logprobs = inputs.teacher_topk_logprobs.clone()
    inputs.teacher_topk_logprobs[0, 4, 2] = math.nan
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs: 1 value\(s\) are NaN .* \(0, 4, 2\)"):
        build_loss(name)(inputs, LossContext())
    inputs, _ = make_inputs()
    inputs.teacher_topk_logprobs = torch.full_like(inputs.teacher_topk_logprobs, math.log(0.3))
    with pytest.raises(ValueError, match="sum to a probability above 1"):
        build_loss(name)(inputs, LossContext())


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_garbage_under_the_mask_contributes_exactly_zero(name: str) -> None:
    inputs, leaf = make_inputs(seed=6)
    clean = build_loss(name)(inputs, LossContext())[0]
    (clean_grad,) = torch.autograd.grad(clean, leaf)
    poisoned, leaf2 = make_inputs(seed=6)
    masked_pos = ~poisoned.loss_mask.bool()
    for field in ("teacher_logprobs", "student_tail_logprobs"):
        setattr(poisoned, field, torch.where(masked_pos, math.nan, getattr(poisoned, field)))
    poisoned.student_logprobs = torch.where(masked_pos, -math.inf, poisoned.student_logprobs)
    poisoned.teacher_topk_logprobs = torch.where(
        masked_pos[..., None], math.inf, poisoned.teacher_topk_logprobs
    )
    loss_sum = build_loss(name)(poisoned, LossContext())[0]
    (grad,) = torch.autograd.grad(loss_sum, leaf2)
    torch.testing.assert_close(loss_sum, clean)
    torch.testing.assert_close(grad, clean_grad)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_batch_without_loss_tokens_gives_zero_not_nan(name: str) -> None:
    inputs, leaf = make_inputs()
    inputs.loss_mask = torch.zeros_like(inputs.loss_mask)
    loss_sum, tokens, metrics = build_loss(name)(inputs, LossContext())
    (grad,) = torch.autograd.grad(loss_sum, leaf, allow_unused=True)
    assert float(loss_sum) == 0 and int(tokens) == 0
    assert grad is not None and torch.all(grad == 0) and torch.isfinite(grad).all()
    assert all(torch.isfinite(v).all() for v in reduce_metrics([metrics]).values())


def test_shape_and_missing_signal_errors() -> None:
    inputs, _ = make_inputs()
    inputs.teacher_logprobs = inputs.teacher_logprobs[:, :-1]
    with pytest.raises(ValueError, match=r"teacher_logprobs: shape \(3, 9\) does not match \(3, 10\)"):
        build_loss("discord")(inputs, LossContext())
    inputs, _ = make_inputs()
    inputs.teacher_logprobs = None
    with pytest.raises(ValueError, match="needs the stored teacher log-probs"):
        build_loss("discord")(inputs, LossContext())
    inputs, _ = make_inputs()
    inputs.teacher_topk_logprobs = inputs.teacher_topk_logprobs[..., :2]
    with pytest.raises(ValueError, match=r"teacher_topk_logprobs: shape \(3, 10, 2\) must equal"):
        build_loss("kl")(inputs, LossContext())
    inputs.teacher_topk_logprobs = None
    with pytest.raises(ValueError, match="needs the teacher's top-k"):
        build_loss("discord", base="kl")(inputs, LossContext())


def test_build_loss_refuses_exactly_what_a_config_refuses() -> None:
    for name, params in (
        ("gkd", {}),
        ("sft", {"tau": 1.0}),
        ("discord", {"tau": 0}),
        ("todi", {"beta": "x"}),
    ):
        with pytest.raises(ValueError) as err:
            build_loss(name, **params)
        assert str(err.value) == "; ".join(loss_problems({"name": name, **params}))
    assert "loss.name='gkd' is not a loss; known: sft, dft" in "; ".join(loss_problems({"name": "gkd"}))
    assert loss_problems({"name": "sft", "tau": 1.0}) == [
        "loss.tau: not a parameter of loss 'sft'; it is a parameter of discord. sft takes: no parameters "
        "(and name, module, label, chunk_size, validate)."
    ]
    assert loss_problems({"name": "discord", "tau": 0}) == ["loss.tau=0.0: must be > 0."]


def test_lambda_schedule() -> None:
    loss = build_loss("discord", lambda_max=0.6, lambda_warmup_fraction=0.2, lambda_ramp_fraction=0.4)
    values = [loss.lam(s, 10) for s in range(10)]
    assert values[:2] == [0.0, 0.0]
    assert values[2:6] == pytest.approx([0.15, 0.3, 0.45, 0.6])
    assert values[6:] == [0.6] * 4
    assert build_loss("discord", lambda_max=0.5).lam(0, 10) == 0.5
