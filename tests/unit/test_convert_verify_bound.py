"""The verification bound of ``import`` / ``export`` (``nemo_dcod.convert.verify.compare_logits``).

In fp32 an absolute 1e-4; in bf16 relative: the other side's error against the reference's fp32
logits within 4x (max) and 2x (mean) of the reference's own bf16 error. Real logits of a tiny
random model stand in for the sides (the end-to-end runs are in
``tests/distributed/test_convert_bf16.py``).
"""

from __future__ import annotations

import pytest
import torch

from nemo_dcod.convert.config import VerifySection
from nemo_dcod.convert.verify import compare_logits


def _sides() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """fp32 logits ``[S, V]`` of a random 2-layer MLP over 3 rows, and the same computed in bf16."""
    gen = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(32, 64, generator=gen) * 0.5, torch.randn(64, 50, generator=gen) * 0.5
    xs = [torch.randn(n, 32, generator=gen) for n in (5, 7, 3)]
    exact = [torch.tanh(x @ w1) @ w2 for x in xs]
    low = [(torch.tanh(x.bfloat16() @ w1.bfloat16()) @ w2.bfloat16()).float() for x in xs]
    return exact, low


def test_fp32_is_an_absolute_bound() -> None:
    exact, _ = _sides()
    near = [e + 5e-5 for e in exact]
    assert compare_logits(exact, near, torch.float32, None).passed
    far = [e + 2e-4 for e in exact]
    result = compare_logits(exact, far, torch.float32, None)
    assert (
        not result.passed and result.tolerance == 1e-4 and "tolerance 0.0001): FAILED" in result.describe("x")
    )


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
