"""DisCorD's ESS guard and the Δ aggregations the study measures, against float64 references.

- Each new variant (``sum``, ``centered``, ``min``) equals a token-by-token reference: Δ, the loss
  and its gradient, with packed documents, prompts and an empty row.
- The guard: λ is capped exactly at sqrt((1/f - 1)/(1/ESS_g - 1)) from the statistics it is
  given; on the statistics' own batch the weights' ESS then equals the floor (the identity the
  cap is derived from); it leaves λ alone when the gate is not degenerate, when off, and when g²
  was not measured; fused and step-by-step paths agree with it on; it depends on the carried
  statistics only, so micro-batches of one step sum to the whole batch; it is logged.
- The carried statistics keep g² across a checkpoint (CarryWeightStats' state).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers.references import documents

from nemo_dcod.losses import LossContext, LossInputs, build_loss, reduce_metrics
from nemo_dcod.losses.registry import loss_problems
from nemo_dcod.losses.types import WeightStats

B, S = 3, 12


def make_inputs(seed: int = 0) -> tuple[LossInputs, torch.Tensor]:
    """Student log-probs from a leaf (its gradient is checked), teacher log-probs, packed documents."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, 6, generator=gen, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, 6, (B, S), generator=gen)
    lq = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    lp = torch.log_softmax(3 * torch.randn(B, S, 6, generator=gen, dtype=torch.float64), -1)[..., 0]
    mask = torch.ones(B, S)
    mask[0, :3] = 0  # a prompt
    mask[1, 6] = 0  # the first token of the second packed document
    mask[2] = 0  # a row with no loss token
    segments = torch.zeros(B, S, dtype=torch.long)
    segments[1, 6:] = 1
    segments[0, 9:] = 4
    inputs = LossInputs(student_logprobs=lq, loss_mask=mask, teacher_logprobs=lp, segment_ids=segments)
    return inputs, logits


def reference_delta(inputs: LossInputs, variant: str, clip: float) -> torch.Tensor:
    """Δ by the book, one document at a time (float64 Python sums)."""
    lq, lp, mask = inputs.student_logprobs.detach(), inputs.teacher_logprobs, inputs.loss_mask
    assert lp is not None
    out = torch.zeros(B, S, dtype=torch.float64)
    for b in range(B):
        for doc in documents(inputs.segment_ids, b, S):
            toks = [t for t in doc if mask[b, t]]
            if not toks:
                continue
            r = {t: float(lq[b, t] - lp[b, t]) for t in toks}
            c = {t: min(max(v, -clip), clip) for t, v in r.items()}
            for t in toks:
                if variant == "sum":
                    out[b, t] = min(max(sum(r.values()), -clip), clip)
                elif variant == "centered":
                    out[b, t] = c[t] - sum(c.values()) / len(c)
                else:  # min
                    out[b, t] = min(c.values())
    return out


def reference_weights(delta: torch.Tensor, mask: torch.Tensor, tau: float, lam: float) -> torch.Tensor:
    tokens = [(b, t) for b in range(B) for t in range(S) if mask[b, t]]
    g = torch.sigmoid(delta / tau)
    g_mean = sum(float(g[b, t]) for b, t in tokens) / len(tokens)
    return (1 - lam) + lam * g / g_mean


@pytest.mark.parametrize("variant", ["sum", "centered", "min"])
@pytest.mark.parametrize("clip", [10.0, 0.7])
def test_aggregation_variants_match_the_reference(variant: str, clip: float) -> None:
    loss = build_loss("discord", variant=variant, clip=clip, tau=0.5, lambda_max=0.9)
    assert loss.requirements.whole_documents
    inputs, leaf = make_inputs()
    delta, _ = loss.delta(inputs)
    want = reference_delta(inputs, variant, clip)
    torch.testing.assert_close(delta, want, rtol=1e-12, atol=1e-12)
    assert delta.abs().max() > 0.05 and len(set(delta[inputs.mask].tolist())) > 1  # not degenerate
    for fused in (True, False):
        inputs, leaf = make_inputs()
        mine = build_loss("discord", variant=variant, clip=clip, tau=0.5, lambda_max=0.9, fused=fused)
        loss_sum, _, metrics = mine(inputs, LossContext())
        (grad,) = torch.autograd.grad(loss_sum, leaf)
        ref_inputs, ref_leaf = make_inputs()
        w = reference_weights(want, ref_inputs.loss_mask, 0.5, 0.9)
        ref = -(w * ref_inputs.student_logprobs * ref_inputs.loss_mask).sum()
        (ref_grad,) = torch.autograd.grad(ref, ref_leaf)
        torch.testing.assert_close(loss_sum, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
        assert torch.all(grad[2] == 0)
        assert float(reduce_metrics([metrics])["lambda"]) == pytest.approx(0.9)


def _gate_moments(inputs: LossInputs, tau: float) -> tuple[float, float]:
    """ḡ and mean(g²) of the token gate over the loss tokens, by the book."""
    lq, lp, mask = inputs.student_logprobs.detach(), inputs.teacher_logprobs, inputs.loss_mask
    assert lp is not None
    gs = [
        1 / (1 + math.exp(-min(max(float(lq[b, t] - lp[b, t]), -10), 10) / tau))
        for b in range(B)
        for t in range(S)
        if mask[b, t]
    ]
    return sum(gs) / len(gs), sum(g * g for g in gs) / len(gs)


@pytest.mark.parametrize("fused", [True, False])
def test_guard_caps_lambda_so_the_ess_equals_the_floor(fused: bool) -> None:
    floor, tau = 0.8, 0.25
    inputs, _ = make_inputs(seed=3)
    g_mean, g_sq_mean = _gate_moments(inputs, tau)
    spread = g_sq_mean / g_mean**2 - 1
    cap = math.sqrt((1 / floor - 1) / spread)
    assert cap < 1, "the test's gate must be degenerate enough for the guard to act"
    guarded = build_loss("discord", tau=tau, ess_floor=floor, fused=fused)
    # Statistics of this very batch (micro_batch mode): the weights' ESS is then exactly the floor.
    metrics = guarded(inputs, LossContext())[2]
    m = reduce_metrics([metrics])
    assert float(m["lambda"]) == pytest.approx(cap, rel=1e-12)
    assert float(m["lambda_scheduled"]) == 1.0 and float(m["guard_scale"]) == pytest.approx(cap, rel=1e-12)
    assert float(m["ess"]) == pytest.approx(floor, rel=1e-10)
    assert float(m["gate_ess"]) == pytest.approx(1 / (1 + spread), rel=1e-12)
    unguarded = reduce_metrics([build_loss("discord", tau=tau, fused=fused)(inputs, LossContext())[2]])
    assert float(unguarded["ess"]) < floor and float(unguarded["guard_scale"]) == 1.0
    # Carried statistics (the plug-in's default): λ comes from them, not from this batch.
    carried = WeightStats(delta_mean=0.0, g_mean=0.5, g_sq_mean=0.4)  # Var(g/ḡ) = 0.6
    loss_sum, _, metrics = guarded(inputs, LossContext(stats=carried))
    lam = math.sqrt((1 / floor - 1) / 0.6)
    assert float(metrics["lambda"]) == pytest.approx(lam, rel=1e-12)
    lq, mask = inputs.student_logprobs, inputs.loss_mask
    g = torch.sigmoid((lq.detach() - inputs.teacher_logprobs).clamp(-10, 10) / tau)  # type: ignore[operator]
    want = -(((1 - lam) + lam * g / 0.5) * lq * mask).sum()
    torch.testing.assert_close(loss_sum, want, rtol=1e-12, atol=1e-12)


def test_guard_leaves_lambda_alone_when_not_needed_off_or_unmeasured() -> None:
    inputs, _ = make_inputs(seed=5)
    ctx = LossContext(step=3, total_steps=10)
    schedule = {"lambda_max": 0.7, "lambda_ramp_fraction": 0.5}
    scheduled = 0.7 * 4 / 5
    flat = build_loss("discord", tau=4.0, ess_floor=0.5, **schedule)  # a flat gate: ESS_w near 1
    assert float(reduce_metrics([flat(inputs, ctx)[2]])["lambda"]) == pytest.approx(scheduled)
    off, default = build_loss("discord", tau=0.25, **schedule), build_loss("discord", tau=0.25, **schedule)
    for loss in (off, build_loss("discord", tau=0.25, ess_floor=0.0, **schedule)):
        out, ref = loss(inputs, ctx), default(inputs, ctx)
        assert torch.equal(out[0], ref[0]) and float(out[2]["guard_scale"]) == 1.0
    no_g_sq = LossContext(step=3, total_steps=10, stats=WeightStats(delta_mean=0.0, g_mean=0.3))
    guarded = build_loss("discord", tau=0.25, ess_floor=0.99, **schedule)
    assert float(guarded(inputs, no_g_sq)[2]["lambda"]) == pytest.approx(scheduled)
    pending = guarded(inputs, LossContext(step=3, total_steps=10, stats_pending=True))[2]
    assert float(pending["lambda"]) == 0.0 and float(pending["guard_scale"]) == 1.0
    assert loss_problems({"name": "discord", "ess_floor": 1.0}) == [
        "loss.ess_floor=1.0: must be in [0, 1) (0: no guard)."
    ]
    assert loss_problems({"name": "discord", "ess_floor": -0.1})


def test_guard_with_carried_statistics_is_independent_of_the_micro_batch_split() -> None:
    inputs, _ = make_inputs(seed=7)
    loss = build_loss("discord", tau=0.25, ess_floor=0.9, center=True)
    stats = loss.weight_stats([inputs], None)  # type: ignore[attr-defined]
    assert stats.g_sq_mean is not None and stats.g_sq_mean > stats.g_mean**2  # measured, spread > 0
    whole = loss(inputs, LossContext(stats=stats))
    parts = [
        loss(LossInputs(**{k: (v[rows] if v is not None else None) for k, v in vars(inputs).items()}),
             LossContext(stats=stats))
        for rows in (slice(0, 1), slice(1, 3))
    ]  # fmt: skip
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole[0], rtol=1e-12, atol=1e-12)
    assert float(parts[0][2]["lambda"]) == float(parts[1][2]["lambda"]) == float(whole[2]["lambda"]) < 1
    merged = reduce_metrics([p[2] for p in parts])
    torch.testing.assert_close(merged["g_sq_sum"], whole[2]["g_sq_sum"], rtol=1e-12, atol=1e-12)


def test_carried_statistics_keep_g_squared_across_a_checkpoint() -> None:
    from nemo_dcod.losses.carry import CarriedStats
    from nemo_dcod.train.callbacks import CarryWeightStats

    def callback(carried: CarriedStats) -> Any:
        cb = CarryWeightStats()
        cb._module = SimpleNamespace(training_loss_reduction=SimpleNamespace(carried=carried))
        return cb

    saved = callback(CarriedStats(stats=WeightStats(0.25, 0.4, 0.19))).state_dict()
    assert saved == {"delta_mean": 0.25, "g_mean": 0.4, "ready": 1.0, "g_sq_mean": 0.19}
    fresh = CarriedStats()
    restored = callback(fresh)
    restored.load_state_dict(saved)
    restored.on_train_start(None, None)  # type: ignore[arg-type]
    assert fresh.stats == WeightStats(0.25, 0.4, 0.19) and fresh.ready
    old = CarriedStats()  # a checkpoint written before g² was carried: the guard waits a step
    legacy = callback(old)
    legacy.load_state_dict({"delta_mean": 0.1, "g_mean": 0.5, "ready": 1.0})
    legacy.on_train_start(None, None)  # type: ignore[arg-type]
    assert old.stats == WeightStats(0.1, 0.5, None)
