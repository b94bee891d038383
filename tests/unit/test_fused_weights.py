"""DisCorD's fused weight chain (``fused=true``) against the step-by-step path (``fused=false``).

The step-by-step path is itself held to the float64 token-by-token references in
``test_losses.py``; here the fused one must give the same loss, gradient and every diagnostic sum,
for every variant, base, centring, clip and source of the statistics (carried, pending, this
micro-batch's own), eagerly (what CPUs run) and once through ``torch.compile`` with inductor on CPU
(what GPUs run, with the same generated graph but C++ instead of Triton kernels).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from nemo_dcod.losses import LossContext, LossInputs, build_loss
from nemo_dcod.losses import diagnostics as diag
from nemo_dcod.losses import weights as wts
from nemo_dcod.losses.types import WeightStats

B, S = 3, 24


def make_inputs(dtype: torch.dtype, seed: int = 0) -> tuple[LossInputs, torch.Tensor]:
    """Per-token signals with prompts, a second packed document, a row without loss tokens, garbage
    under the mask, Δ beyond the clip; returns (inputs, the student log-prob leaf)."""
    gen = torch.Generator().manual_seed(seed)
    lq = (-6 * torch.rand(B, S, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()
    lp = -6 * torch.rand(B, S, generator=gen, dtype=torch.float64).to(dtype)
    lp[0, 4] = -40.0  # raw Δ far above any clip used here
    mask = torch.ones(B, S)
    mask[0, :3] = 0
    mask[1, 12] = 0
    mask[2] = 0
    lp[2, 0] = float("nan")  # under the mask: must not reach anything
    segments = torch.zeros(B, S, dtype=torch.long)
    segments[1, 12:] = 1
    k = 3
    topk = torch.log_softmax(torch.randn(B, S, k + 1, generator=gen, dtype=torch.float64), -1)[..., :k]
    inputs = LossInputs(
        student_logprobs=lq,
        loss_mask=mask,
        teacher_logprobs=lp,
        student_topk_logprobs=topk.to(dtype) + 0.1 * lq.unsqueeze(-1),
        student_tail_logprobs=-2.0 + 0.05 * lq,
        teacher_topk_logprobs=topk.to(dtype),
        segment_ids=segments,
    )
    return inputs, lq


STATS: dict[str, dict[str, Any]] = {
    "carried": {"stats": WeightStats(delta_mean=0.3, g_mean=0.45)},
    "carried_zero_g": {"stats": WeightStats(delta_mean=0.0, g_mean=0.0)},  # ḡ <= 0 -> 1
    "pending": {"stats_pending": True},
    "micro_batch": {},
}
CASES = [
    {"variant": v, "base": base, "center": center, "clip": clip, "tau": tau, "stats": name}
    for v, base, (center, clip, tau), name in itertools.product(
        ("token", "prefix", "sequence"),
        ("ce", "kl"),
        ((False, 10.0, 1.0), (True, 1.5, 0.5)),
        STATS,
    )
]


def run(case: dict[str, Any], fused: bool, dtype: torch.dtype) -> tuple[Any, torch.Tensor]:
    params = {k: v for k, v in case.items() if k != "stats"}
    loss = build_loss("discord", **params, window=4, lambda_max=0.7, lambda_ramp_fraction=0.5, fused=fused)
    inputs, leaf = make_inputs(dtype)
    ctx = LossContext(step=3, total_steps=10, **STATS[case["stats"]])
    out = loss(inputs, ctx)
    (grad,) = torch.autograd.grad(out[0], leaf)
    return out, grad


def assert_same(fused_out: Any, ref_out: Any, grads: tuple[torch.Tensor, torch.Tensor], tol: float) -> None:
    (loss_sum, tokens, metrics), (ref_sum, ref_tokens, ref_metrics) = fused_out, ref_out
    assert set(metrics) == set(ref_metrics)
    torch.testing.assert_close(loss_sum, ref_sum, rtol=tol, atol=tol)
    assert int(tokens) == int(ref_tokens)
    torch.testing.assert_close(grads[0], grads[1], rtol=tol, atol=tol)
    for key, ref in ref_metrics.items():
        got = metrics[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_fused_equals_step_by_step_in_float64(case: dict[str, Any]) -> None:
    (out, grad), (ref, ref_grad) = run(case, True, torch.float64), run(case, False, torch.float64)
    assert_same(out, ref, (grad, ref_grad), tol=1e-12)
    assert torch.isfinite(out[0]) and torch.all(grad[2] == 0)
    lam = float(ref[2]["lambda"])
    assert lam == (0.0 if case["stats"] == "pending" else pytest.approx(0.7 * 4 / 5))
    n, sw, sw2 = (float(ref[2][k]) for k in ("tokens", "weight_sum", "weight_sq_sum"))
    if lam > 0:  # the weights vary: the comparison sees the gate
        assert sw2 / n - (sw / n) ** 2 > 1e-4


def test_fused_equals_step_by_step_in_float32() -> None:
    for case in CASES[::5]:
        (out, grad), (ref, ref_grad) = run(case, True, torch.float32), run(case, False, torch.float32)
        assert_same(out, ref, (grad, ref_grad), tol=2e-5)


def test_masked_histogram_counts_like_the_diagnostics() -> None:
    gen = torch.Generator().manual_seed(1)
    values = torch.cat([torch.tensor([0.0, 0.25, 3.99, 4.0, 17.0, -0.1]), 5 * torch.rand(200, generator=gen)])
    mask = torch.rand(values.shape, generator=gen) > 0.3
    mask[:6] = True
    want = diag._histogram(values[mask])
    got = wts.masked_histogram(values.reshape(2, -1), mask.reshape(2, -1))
    torch.testing.assert_close(got, want)
    assert got.sum() == mask.sum()
    assert wts.WEIGHT_HIST_EDGES == diag.WEIGHT_HIST_EDGES


@pytest.fixture
def fresh_fusion(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty compile cache and no recorded fallback, restored after the test."""
    monkeypatch.setattr(wts, "_COMPILED", {})
    monkeypatch.setattr(wts, "_FALLBACKS", [])
    yield


def test_compiled_chain_equals_step_by_step(monkeypatch: pytest.MonkeyPatch, fresh_fusion: None) -> None:
    """torch.compile (inductor, CPU) of the fused functions: the values of the eager path, no
    fallback taken, and a change of λ / b / ḡ (device scalars) does not recompile."""
    monkeypatch.setenv(wts.COMPILE_ENV, "1")
    for name in ("carried", "micro_batch"):
        case = {"variant": "token", "base": "ce", "center": True, "clip": 1.5, "tau": 0.5, "stats": name}
        (out, grad), (ref, ref_grad) = run(case, True, torch.float32), run(case, False, torch.float32)
        assert_same(out, ref, (grad, ref_grad), tol=2e-5)
    assert wts.fusion_fallbacks() == []
    assert set(wts._COMPILED) == {wts.token_weight_chain, wts.weight_chain, wts.gate_sum}
    compiled = wts._COMPILED[wts.token_weight_chain]
    inputs, _ = make_inputs(torch.float32)
    loss = build_loss("discord", center=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for stats in (WeightStats(0.1, 0.2), WeightStats(-0.4, 0.9)):
            loss(inputs, LossContext(step=1, total_steps=4, stats=stats))
    assert wts._COMPILED[wts.token_weight_chain] is compiled


def test_failed_compilation_falls_back_to_eager_once(
    monkeypatch: pytest.MonkeyPatch, fresh_fusion: None
) -> None:
    """A backend that cannot compile (here: one that raises) warns once, with the reason, and the
    loss is the eager value; later calls do not try again."""

    def broken_compile(fn: Any, **kwargs: Any) -> Any:
        def fail(*args: Any) -> Any:
            raise RuntimeError("no C++ compiler found")

        return fail

    monkeypatch.setenv(wts.COMPILE_ENV, "1")
    monkeypatch.setattr(wts.torch, "compile", broken_compile)
    case = {"variant": "token", "base": "ce", "center": False, "clip": 10.0, "tau": 1.0, "stats": "carried"}
    with pytest.warns(RuntimeWarning, match="could not be compiled .*no C\\+\\+ compiler found"):
        out, grad = run(case, True, torch.float64)
    ref, ref_grad = run(case, False, torch.float64)
    assert_same(out, ref, (grad, ref_grad), tol=1e-12)
    assert len(wts.fusion_fallbacks()) == 1
    assert wts.fused(wts.weight_chain, torch.device("cpu")) is wts.weight_chain  # no second try


def test_compiling_is_off_on_cpu_unless_asked(monkeypatch: pytest.MonkeyPatch, fresh_fusion: None) -> None:
    monkeypatch.delenv(wts.COMPILE_ENV, raising=False)
    assert wts.fused(wts.weight_chain, torch.device("cpu")) is wts.weight_chain
    monkeypatch.setenv(wts.COMPILE_ENV, "0")
    assert wts.fused(wts.weight_chain, torch.device("cuda")) is wts.weight_chain
    monkeypatch.setenv(wts.COMPILE_ENV, "1")
    assert wts.fused(wts.weight_chain, torch.device("cpu")) is not wts.weight_chain
