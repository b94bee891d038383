"""Seed statistics of a study: mean and spread over seeds, and a paired comparison with a baseline.

Every student of a seed starts from the same checkpoint and sees the same data, so the fair test
of "does this student beat the baseline" is *paired* by seed: the per-seed differences
``d_s = x_student,s - x_baseline,s`` remove what a seed does to every student alike (its problems,
its teacher samples, its initialisation). The test used throughout the report:

* **paired t interval**: mean(d) ± t_{0.975, n-1} · sd(d) / √n, the two-sided 95% interval of the
  mean difference (sd with n - 1). A difference is **beyond the seed noise** when that interval
  excludes 0. With n = 3 seeds, t = 4.303: only a difference large against its own seed-to-seed
  spread counts.
* **sign count**: on how many seeds the student was better / equal / worse (the exact two-sided
  sign-test p-value is given; with 3 seeds it is at least 0.25, so it can never decide alone).

With one seed there is no interval (None): the report says "—", never "beyond noise".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["T_975", "Paired", "Spread", "paired", "sign_test_p", "spread", "t_critical"]

T_975: tuple[float, ...] = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
"""Student's t quantile t_{0.975, df} for df = 1..30 (above 30: the normal's 1.96 is used)."""


def t_critical(df: int) -> float:
    """t_{0.975, df}, the two-sided 95% critical value of Student's t."""
    if df < 1:
        raise ValueError(f"df={df}: needs at least one degree of freedom (two seeds).")
    return T_975[df - 1] if df <= len(T_975) else 1.96


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (n - 1) of a metric over seeds; std is None for n = 1."""

    mean: float | None
    std: float | None
    n: int
    values: tuple[float, ...]


def spread(values: Sequence[float | None]) -> Spread:
    """:class:`Spread` of the finite values (None and NaN, e.g. a style never chosen, are left out)."""
    xs = tuple(float(v) for v in values if v is not None and math.isfinite(v))
    n = len(xs)
    if n == 0:
        return Spread(None, None, 0, ())
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return Spread(mean, std, n, xs)


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign-test p-value of ``wins`` vs ``losses`` (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """A student against the baseline on one metric, seed by seed (only seeds both finished)."""

    n: int
    mean_diff: float | None
    sd_diff: float | None
    ci_low: float | None
    ci_high: float | None
    wins: int
    ties: int
    losses: int
    sign_p: float
    beyond_noise: bool | None
    """The 95% paired t interval excludes 0; None with fewer than two seeds."""
    diffs: tuple[float, ...]

    def as_dict(self) -> dict[str, object]:
        """Plain values for summary.json."""
        out = asdict(self)
        out["diffs"] = list(self.diffs)
        return out


def paired(student: dict[int, float | None], baseline: dict[int, float | None]) -> Paired:
    """The paired comparison of ``student`` with ``baseline`` (per-seed values; see the module docstring)."""

    def ok(v: float | None) -> bool:
        return v is not None and math.isfinite(v)

    seeds = sorted(s for s in student if s in baseline and ok(student[s]) and ok(baseline[s]))
    diffs = tuple(float(student[s]) - float(baseline[s]) for s in seeds)  # type: ignore[arg-type]
    n = len(diffs)
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    if n == 0:
        return Paired(0, None, None, None, None, 0, 0, 0, 1.0, None, ())
    mean = sum(diffs) / n
    if n < 2:
        return Paired(
            n, mean, None, None, None, wins, n - wins - losses, losses, sign_test_p(wins, losses), None, diffs
        )
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_critical(n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    beyond = low > 0 or high < 0
    return Paired(
        n, mean, sd, low, high, wins, n - wins - losses, losses, sign_test_p(wins, losses), beyond, diffs
    )
