"""The verification bound of ``import`` / ``export`` (``nemo_dcod.convert.verify.compare_logits``).

In fp32 scaled to the model: ``max(1e-4, 8 * eps32 * max|logit| * sqrt(layers * hidden))``, checked
here against the real fp32 rounding of residual networks of growing depth and width (fp32 vs fp64:
inside the bound with room, and a planted error outside it); in bf16 relative: the other side's
error against the reference's fp32 logits within 4x (max) and 2x (mean) of the reference's own bf16
error. Real logits of a tiny random model stand in for the sides (the end-to-end runs are in
``tests/distributed/test_convert_bf16.py`` and, on the real SmolLM2-135M,
``tests/distributed/test_real_model.py``).
"""

from __future__ import annotations

import pytest
import torch

from nemo_dcod.convert.config import FP32_FACTOR, FP32_FLOOR, VerifySection, fp32_tolerance
from nemo_dcod.convert.verify import compare_logits


def _sides() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """fp32 logits ``[S, V]`` of a random 2-layer MLP over 3 rows, and the same computed in bf16."""
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(32, 64, generator=gen) * 0.5, torch.randn(64, 50, generator=gen) * 0.5
    xs = [torch.randn(n, 32, generator=gen) for n in (5, 7, 3)]
    exact = [torch.tanh(x @ w1) @ w2 for x in xs]
    low = [(torch.tanh(x.bfloat16() @ w1.bfloat16()) @ w2.bfloat16()).float() for x in xs]
    return exact, low


def test_fp32_bound_follows_logit_scale_depth_and_width() -> None:
    eps = torch.finfo(torch.float32).eps
    # The documented figures (config.py, verify.py) at logits up to 40.
    assert fp32_tolerance(40.0, 30, 576) == pytest.approx(5.01e-3, rel=1e-2)  # SmolLM2-135M
    assert fp32_tolerance(40.0, 32, 4096) == pytest.approx(1.38e-2, rel=1e-2)  # Llama-3.1-8B
    assert fp32_tolerance(40.0, 80, 8192) == pytest.approx(3.09e-2, rel=1e-2)  # Llama-3.1-70B
    assert fp32_tolerance(40.0, 32, 4096) == pytest.approx(FP32_FACTOR * eps * 40.0 * (32 * 4096) ** 0.5)
    assert fp32_tolerance(80.0, 32, 4096) == pytest.approx(2 * fp32_tolerance(40.0, 32, 4096))
    assert fp32_tolerance(4.0, 4, 64) == FP32_FLOOR == 1e-4  # tiny models: never below the old bound


def test_fp32_bound_is_applied_and_reported() -> None:
    exact, _ = _sides()
    tol = fp32_tolerance(max(float(e.abs().max()) for e in exact), 30, 576)
    near = [e + 0.4 * tol for e in exact]
    ok = compare_logits(exact, near, torch.float32, None, model_shape=(30, 576))
    assert ok.passed and ok.tolerance == pytest.approx(tol) and ok.margin == pytest.approx(2.5, rel=1e-3)
    assert "fp32 bound for 30 layers x 576, margin 2.5x): ok" in ok.describe("x")
    assert ok.summary()["fp32_bound"]["num_layers"] == 30
    far = [e + 1.5 * tol for e in exact]
    bad = compare_logits(exact, far, torch.float32, None, model_shape=(30, 576))
    assert not bad.passed and "FAILED" in bad.describe("x")
    # The same difference on a model 100x wider passes: its rounding is 10x larger.
    assert compare_logits(exact, far, torch.float32, None, model_shape=(30, 57600)).passed
    # An explicit tolerance is an absolute bound, not scaled.
    strict = compare_logits(exact, near, torch.float32, 1e-6, model_shape=(30, 576))
    assert not strict.passed and strict.model_shape is None and "fp32_bound" not in strict.summary()
    with pytest.raises(ValueError, match=r"needs the model's \(layers, hidden\)"):
        compare_logits(exact, near, torch.float32, None)


def _residual_logits(
    depth: int, width: int, dtype: torch.dtype, swap_layer: int | None = None
) -> list[torch.Tensor]:
    """``[S, V]`` logits of a pre-norm residual MLP stack (RMSNorm, SiLU-gated MLP, tied-style output
    projection) with fixed random weights, computed in ``dtype``: the reduction shapes of a
    transformer's blocks. ``swap_layer``: that layer's gate and up weights swapped (a wrong conversion)."""
    gen = torch.Generator().manual_seed(depth * 1000 + width)
    vocab, rows = 512, 3
    embed = torch.randn(vocab, width, generator=gen, dtype=torch.float64)
    layers = []
    for _ in range(depth):
        gate, up = (
            torch.randn(width, 2 * width, generator=gen, dtype=torch.float64) / width**0.5 for _ in "gu"
        )
        down = torch.randn(2 * width, width, generator=gen, dtype=torch.float64) / (2 * width) ** 0.5
        layers.append((gate, up, down))
    if swap_layer is not None:
        gate, up, down = layers[swap_layer]
        layers[swap_layer] = (up, gate, down)
    ids = torch.randint(0, vocab, (rows, 16), generator=gen)
    out = []
    for row in ids:
        x = embed[row].to(dtype)
        for gate, up, down in layers:
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            x = x + (torch.nn.functional.silu(h @ gate.to(dtype)) * (h @ up.to(dtype))) @ down.to(dtype)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        out.append((h @ embed.to(dtype).T).to(torch.float64))
    return out


@pytest.mark.parametrize(("depth", "width"), [(2, 64), (8, 128), (16, 256), (4, 512)])
def test_fp32_rounding_stays_well_inside_the_bound(depth: int, width: int) -> None:
    """fp32 vs fp64 of the same network: the rounding the bound must allow, at several shapes. The
    ratio err / (eps32 * max|logit| * sqrt(depth * width)) measured here is 0.05-0.18 (on SmolLM2
    0.09-0.29 against fp64, 0.45 between two fp32 sides); FP32_FACTOR = 8 keeps it >= 10x inside,
    and a swapped gate/up fails by far."""
    exact = _residual_logits(depth, width, torch.float64)
    fp32 = _residual_logits(depth, width, torch.float32)
    ok = compare_logits(exact, fp32, torch.float32, None, model_shape=(depth, width))
    scaled = fp32_tolerance(ok.logit_scale, depth, width)
    assert ok.max_abs > 0 and ok.max_abs * 10 <= scaled, (ok.max_abs, scaled)  # >= 10x inside
    assert ok.passed
    wrong = _residual_logits(depth, width, torch.float32, swap_layer=depth // 2)
    bad = compare_logits(exact, wrong, torch.float32, None, model_shape=(depth, width))
    assert not bad.passed and bad.max_abs > 100 * bad.tolerance, (bad.max_abs, bad.tolerance)


def test_bf16_is_relative_to_the_references_own_rounding() -> None:
    exact, low = _sides()
    # The other side: its own bf16 rounding errors, of the size of the reference's.
    other = [(e.bfloat16().float() + (lo - e) * 0.5) for e, lo in zip(exact, low, strict=True)]
    ok = compare_logits(low, other, torch.bfloat16, None, exact)
    assert ok.passed and ok.relative and ok.tolerance is None
    assert "ratios" in ok.describe("x") and ok.summary()["vs_reference_fp32"]["factors"] == {
        "max": 4.0,
        "mean": 2.0,
    }
    # Ten times the reference's own error on every logit: a conversion error, not rounding.
    wrong = [e + 10 * (lo - e) for e, lo in zip(exact, low, strict=True)]
    bad = compare_logits(low, wrong, torch.bfloat16, None, exact)
    assert not bad.passed and bad.ratios()[1] > 2
    # The same wrong side under an explicit absolute bound large enough: passes (the user's call).
    loose = compare_logits(low, wrong, torch.bfloat16, 100.0, exact)
    assert loose.passed and not loose.relative


def test_bf16_without_fp32_reference_is_refused() -> None:
    _, low = _sides()
    with pytest.raises(ValueError, match="needs the reference's fp32 logits"):
        compare_logits(low, low, torch.bfloat16, None)


def test_exact_reference_needs_an_exact_other_side() -> None:
    exact, _ = _sides()
    assert compare_logits(exact, exact, torch.bfloat16, None, exact).passed  # 0 over 0
    off = [e + 1e-3 for e in exact]
    assert not compare_logits(exact, off, torch.bfloat16, None, exact).passed  # > 0 over 0


def test_verify_and_export_dtype_choices() -> None:
    from nemo_dcod.config import ConfigError, load_config
    from nemo_dcod.convert.config import ExportConfig

    assert VerifySection().dtype == "fp32"
    cfg = load_config(ExportConfig, None, ["checkpoint=/a", "hf_out=/b", "dtype=bf16"])
    assert cfg.dtype == "bf16"
    with pytest.raises(ConfigError, match=r"dtype='fp8': must be one of checkpoint, bf16, fp16, fp32"):
        load_config(ExportConfig, None, ["checkpoint=/a", "hf_out=/b", "dtype=fp8"])
