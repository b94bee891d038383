"""DisCorD's carried statistics (``loss.stats=previous_step``), the weight cap, and the plain
Megatron ``loss_func``'s handling of both, in float64.

- Pairing: what a step carries to the next is exactly ``weight_stats`` of its whole global batch
  (b, then ḡ and mean g² measured with that same b), whatever its split into micro-batches; on
  that batch the next step's weights therefore average exactly 1. The old pairing (ḡ measured with
  the b of the step before, stored beside the new b) misses 1 on the same data: shown, so this
  test can fail.
- Non-finite statistics are refused where they would be carried, saved or restored, naming the
  step and the statistic.
- ``w_max`` caps every weight, counts what it lowered (``capped_fraction``), and the fused and
  step-by-step paths agree with it on.
- ``make_loss_func`` honours ``loss.stats``: it refuses ``previous_step`` without a carrier, carries
  the statistics through one when given (equal to the NeMo reduction's), reads without measuring
  in evaluation, refuses whole-document losses under context parallelism.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from test_study_losses import make_inputs

from nemo_dcod.losses import LossContext, LossInputs, build_loss, reduce_metrics
from nemo_dcod.losses.carry import CarriedStats, NonFiniteStatsError
from nemo_dcod.losses.types import WeightStats, masked

TAU = 0.5


def _split(inputs: LossInputs) -> list[LossInputs]:
    """The batch's rows as micro-batches of one row each."""
    fields = ("student_logprobs", "loss_mask", "teacher_logprobs", "segment_ids")
    return [LossInputs(**{f: getattr(inputs, f)[i : i + 1] for f in fields}) for i in range(3)]


def _mean_weight(loss: Any, batch: list[LossInputs], stats: WeightStats) -> float:
    """Σ m w / Σ m over ``batch`` at λ = 1 with ``stats``."""
    total = count = 0.0
    for mb in batch:
        _, n, metrics = loss(mb, LossContext(step=5, total_steps=10, stats=stats))
        total, count = total + float(metrics["weight_sum"]), count + float(n)
    return total / count


@pytest.mark.parametrize("fused", [True, False])
def test_carried_statistics_are_the_whole_batch_s_and_pair_g_bar_with_its_b(fused: bool) -> None:
    loss = build_loss("discord", tau=TAU, center=True, fused=fused)
    carry = CarriedStats()
    previous = WeightStats(delta_mean=-2.0, g_mean=0.3)  # what step 0 was weighed with
    batch = [mb for seed in (1, 2) for mb in _split(make_inputs(seed)[0])]
    for mb in batch:  # step 0, micro-batch by micro-batch
        loss(mb, LossContext(step=0, total_steps=10, stats=previous, carry=carry))
    assert carry.step == 0 and carry.stats is None  # nothing measured before the step ends
    carried = carry.end_step(loss, None)
    assert carried is not None and carry.stats is carried and carry.ready
    exact = loss.weight_stats(batch, None)
    assert carried.delta_mean == pytest.approx(exact.delta_mean, rel=1e-12, abs=1e-14)
    assert carried.g_mean == pytest.approx(exact.g_mean, rel=1e-12)
    assert carried.g_sq_mean == pytest.approx(exact.g_sq_mean, rel=1e-12)
    # By hand: b over every loss token, then ḡ with that b.
    deltas = [loss.delta(mb)[0] for mb in batch]
    n = sum(float(mb.mask.sum()) for mb in batch)
    b = sum(float(masked(d, mb.mask).sum()) for d, mb in zip(deltas, batch, strict=True)) / n
    g = [torch.sigmoid((d - b) / TAU) for d in deltas]
    g_bar = sum(float(masked(x, mb.mask).sum()) for x, mb in zip(g, batch, strict=True)) / n
    assert carried.delta_mean == pytest.approx(b, rel=1e-12) and carried.g_mean == pytest.approx(
        g_bar, rel=1e-12
    )
    # The next step's weights average exactly 1 on the batch the statistics describe ...
    assert _mean_weight(loss, batch, carried) == pytest.approx(1.0, abs=1e-12)
    # ... which the old pairing (ḡ measured with the previous b, stored next to the new b) misses.
    stale_g = sum(
        float(masked(torch.sigmoid((d - previous.delta_mean) / TAU), mb.mask).sum())
        for d, mb in zip(deltas, batch, strict=True)
    )
    stale = WeightStats(delta_mean=b, g_mean=stale_g / n)
    assert abs(_mean_weight(loss, batch, stale) - 1.0) > 0.05
    # The same statistics whatever the split: the whole batch as two micro-batches of 3 rows.
    other = CarriedStats()
    for seed in (1, 2):
        loss(make_inputs(seed)[0], LossContext(step=0, total_steps=10, stats=previous, carry=other))
    regrouped = other.end_step(loss, None)
    assert regrouped is not None and regrouped.g_mean == pytest.approx(carried.g_mean, rel=1e-12)
    assert regrouped.delta_mean == pytest.approx(carried.delta_mean, rel=1e-12, abs=1e-14)


def test_a_non_finite_statistic_stops_naming_the_step_and_the_statistic() -> None:
    loss = build_loss("discord", center=True)
    carry = CarriedStats()
    inputs = make_inputs(0)[0]
    lp = inputs.teacher_logprobs
    assert lp is not None
    bad = lp.clone()
    bad[1, 4] = float("nan")  # on a loss token: with validation off nothing stops it earlier
    inputs.teacher_logprobs = bad
    loss(
        inputs,
        LossContext(step=3, total_steps=10, stats=None, stats_pending=True, carry=carry, validate=False),
    )
    with pytest.raises(NonFiniteStatsError, match=r"b \(mean Δ\) = nan measured on step 3's batch"):
        carry.end_step(loss, None)
    assert carry.stats is None  # nothing carried
    # A NaN off the loss mask is not a problem (prompts and padding may hold anything).
    inputs.teacher_logprobs = lp.clone()
    inputs.teacher_logprobs[0, 0] = float("nan")
    loss(inputs, LossContext(step=4, total_steps=10, stats_pending=True, carry=carry, validate=False))
    assert carry.end_step(loss, None) is not None and math.isfinite(carry.stats.g_mean)  # type: ignore[union-attr]


def test_non_finite_statistics_are_neither_saved_nor_restored() -> None:
    from nemo_dcod.train.callbacks import CarryWeightStats

    def callback(carried: CarriedStats) -> Any:
        cb = CarryWeightStats()
        cb._module = SimpleNamespace(training_loss_reduction=SimpleNamespace(carried=carried))
        return cb

    with pytest.raises(NonFiniteStatsError, match=r"ḡ \(mean gate\) = inf about to be saved"):
        callback(CarriedStats(stats=WeightStats(0.0, math.inf, 0.5))).state_dict()
    restored = callback(CarriedStats())
    restored.load_state_dict({"delta_mean": math.nan, "g_mean": 0.5, "ready": 1.0})
    with pytest.raises(NonFiniteStatsError, match="restored from the checkpoint"):
        restored.on_train_start(None, None)  # type: ignore[arg-type]
    waiting = CarriedStats()  # saved before any statistics were usable: the next step has λ = 0
    pending = callback(waiting)
    pending.load_state_dict({"delta_mean": 0.1, "g_mean": 0.5, "ready": 0.0})
    pending.on_train_start(None, None)  # type: ignore[arg-type]
    assert waiting.stats is None and not waiting.ready


@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_w_max_caps_weights_and_counts_them_fused_as_step_by_step(variant: str) -> None:
    stats = WeightStats(delta_mean=0.0, g_mean=0.2, g_sq_mean=0.09)  # ḡ small: weights up to 5
    out = {}
    for fused in (True, False):
        loss = build_loss("discord", tau=TAU, w_max=2.0, variant=variant, fused=fused)
        inputs, logits = make_inputs(0)
        loss_sum, _, metrics = loss(inputs, LossContext(step=5, total_steps=10, stats=stats))
        loss_sum.backward()
        assert logits.grad is not None
        out[fused] = (float(loss_sum), logits.grad.clone(), reduce_metrics([metrics]))
    uncapped = build_loss("discord", tau=TAU, variant=variant)
    _, _, plain = uncapped(make_inputs(0)[0], LossContext(step=5, total_steps=10, stats=stats))
    (s_f, g_f, m_f), (s_s, g_s, m_s) = out[True], out[False]
    assert s_f == pytest.approx(s_s, rel=1e-12) and torch.allclose(g_f, g_s, rtol=1e-10, atol=1e-14)
    assert float(m_f["capped_fraction"]) == float(m_s["capped_fraction"]) > 0  # the cap acted
    assert float(reduce_metrics([plain])["capped_fraction"]) == 0.0
    hist = m_f["weight_hist"]  # bins of 0.25: nothing at or above 2.25
    assert float(hist[9:].sum()) == 0 and float(m_f["weight_mean"]) < float(
        reduce_metrics([plain])["weight_mean"]
    )


def test_w_max_below_one_is_refused() -> None:
    from nemo_dcod.losses.registry import loss_problems

    assert any("w_max=0.5" in p for p in loss_problems({"name": "discord", "w_max": 0.5}))
    assert not loss_problems({"name": "discord", "w_max": 3.0})


def _logits_batch(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 8, (2, 6), generator=gen)
    teacher = torch.log_softmax(2 * torch.randn(2, 6, 8, generator=gen, dtype=torch.float64), -1)
    batch = {
        "labels": labels,
        "loss_mask": torch.ones(2, 6),
        "teacher_logprobs": teacher.gather(-1, labels[..., None])[..., 0],
        "segment_ids": torch.zeros(2, 6, dtype=torch.long),
    }
    return logits, batch


def test_make_loss_func_honours_loss_stats() -> None:
    from nemo_dcod.model.megatron_loss import make_loss_func

    loss = build_loss("discord", center=True)
    logits, batch = _logits_batch(0)
    with pytest.raises(ValueError, match=r"stats='previous_step'.*carry=CarriedStats\(\)"):
        make_loss_func(loss, batch, step=0, total_steps=4, vocab_size=8)  # type: ignore[arg-type]
    carry = CarriedStats()
    seen = []
    for step in range(3):
        for seed in (step, step + 10):  # two micro-batches a step
            logits, batch = _logits_batch(seed)
            fn = make_loss_func(loss, batch, step=step, total_steps=4, vocab_size=8, carry=carry)  # type: ignore[arg-type]
            _, _, logged = fn(logits)
        seen.append(float(logged["dcod lambda"]))
    assert seen == [0.0, 1.0, 1.0]  # the first step has no statistics; the next ones do
    # What step 1 carried is weight_stats of its two micro-batches (made on step 2's first call).
    step_1 = [_logits_batch(1), _logits_batch(11)]
    carried_at_2 = carry.stats
    assert carried_at_2 is not None
    inputs = [
        LossInputs(
            student_logprobs=torch.log_softmax(lg, -1).gather(-1, b["labels"][..., None])[..., 0],
            loss_mask=b["loss_mask"],
            teacher_logprobs=b["teacher_logprobs"],
            segment_ids=b["segment_ids"],
        )
        for lg, b in step_1
    ]
    assert carried_at_2.g_mean == pytest.approx(loss.weight_stats(inputs, None).g_mean, rel=1e-12)
    # Evaluation reads the statistics and keeps nothing.
    held = carry.step
    fn = make_loss_func(loss, batch, step=7, total_steps=4, vocab_size=8, carry=carry, training=False)  # type: ignore[arg-type]
    fn(logits)
    assert carry.step == held and carry.stats is carried_at_2
    # micro_batch statistics need no carrier.
    per_mb = build_loss("discord", stats="micro_batch")
    make_loss_func(per_mb, batch, step=0, total_steps=4, vocab_size=8)(logits)  # type: ignore[arg-type]


def test_make_loss_func_refuses_whole_documents_under_context_parallelism_and_without_segments() -> None:
    from nemo_dcod.model.megatron_loss import make_loss_func

    logits, batch = _logits_batch(0)
    sequence = build_loss("discord", variant="sequence", stats="micro_batch")
    with pytest.raises(ValueError, match="context parallelism"):
        make_loss_func(sequence, batch, step=0, total_steps=4, vocab_size=8, cp_size=2)  # type: ignore[arg-type]
    token = build_loss("discord", stats="micro_batch")
    make_loss_func(token, batch, step=0, total_steps=4, vocab_size=8, cp_size=2)  # the token variant is fine
    no_segments = {k: v for k, v in batch.items() if k != "segment_ids"}
    fn = make_loss_func(sequence, no_segments, step=0, total_steps=4, vocab_size=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="segment_ids: this loss forms Δ over whole documents"):
        fn(logits)
