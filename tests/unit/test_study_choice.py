"""The choice analysis (:mod:`nemo_dcod.study.choice`) on hand-made inputs.

- The token variant's fixed point: SFT's share when the gate is flat (large τ), a runaway to the
  minority style below a critical τ, a share in between above it.
- The weighted style share at the style token equals the weights computed by hand (token variant)
  and, with the ``min`` variant, follows the trace's worst token.
"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_dcod.losses import LossInputs
from nemo_dcod.study.choice import fixed_point, weighted_shares


def test_fixed_point_of_the_style_token() -> None:
    share, p = 0.605, 0.65
    assert fixed_point(share, p, 1e6) == pytest.approx(share, abs=1e-4)  # flat gate: SFT
    assert fixed_point(share, p, 0.25) < 1e-6  # sharp gate: runaway to the minority style
    assert 0.5 < fixed_point(share, p, 1.0) < share  # in between: a little less shortcut, still chosen
    q = fixed_point(share, p, 1.0, steps=5000)
    g_sc = 1 / (1 + math.exp(-math.log(q / p)))
    g_sw = 1 / (1 + math.exp(-math.log((1 - q) / (1 - p))))
    assert q == pytest.approx(share * g_sc / (share * g_sc + (1 - share) * g_sw), abs=1e-9)  # a fixed point


def test_weighted_shares_equal_the_weights_by_hand() -> None:
    # 3 traces of the 3-op layout: two shortcut (13 tokens), one stepwise (21 tokens).
    num_ops, width = 3, 21
    lq = torch.full((3, width), -0.1, dtype=torch.float64)
    lp = torch.zeros(3, width, dtype=torch.float64)
    mask = torch.zeros(3, width)
    mask[0, :13] = mask[1, :13] = 1
    mask[2, :] = 1
    lq[:, 0] = torch.tensor([-0.3, -0.3, -1.0], dtype=torch.float64)  # the style word
    lq[0, 2 * num_ops + 3] = -2.0  # a shortcut trace whose result token the student cannot produce
    inputs = LossInputs(student_logprobs=lq, loss_mask=mask, teacher_logprobs=lp)
    rows = {
        (r["variant"], r["tau"]): r
        for r in weighted_shares(inputs, ["shortcut", "shortcut", "stepwise"], num_ops)
    }
    g = torch.sigmoid(lq / 1.0)
    w = g / g[mask.bool()].mean()
    token = rows[("token", 1.0)]
    assert token["weighted_shortcut_share"] == pytest.approx(
        float((w[0, 0] + w[1, 0]) / w[:, 0].sum()), rel=1e-12
    )
    assert token["shortcut_result_weight"] == pytest.approx(float((w[0, 9] + w[1, 9]) / 2), rel=1e-12)
    assert token["stepwise_result_weight"] == pytest.approx(float(w[2, [5, 11, 17]].mean()), rel=1e-12)
    low = rows[("min", 1.0)]  # trace 0 is gated by its result token, trace 1 and 2 by their style words
    mins = torch.tensor([-2.0, -0.3, -1.0], dtype=torch.float64)
    g_min = torch.sigmoid(mins)
    counts = mask.sum(1)
    w0 = g_min / ((g_min * counts).sum() / counts.sum())
    assert low["weighted_shortcut_share"] == pytest.approx(float((w0[0] + w0[1]) / w0.sum()), rel=1e-12)
