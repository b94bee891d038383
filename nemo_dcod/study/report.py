"""A study's report: ``summary.json``, the tables (``summary.md`` and stdout), the plots.

Every table is rendered from ``summary.json``'s numbers by the functions here and nothing else,
so the printed tables, ``summary.md`` and the JSON cannot disagree (the study test parses the
tables and compares each cell with the JSON).

The main table, one row per student, every cell ``mean ± std`` over the seeds (the sample standard
deviation; a single seed shows its value alone):

- **accuracy**: greedy pass@1 on the seed's held-out problems (``nemo-dcod eval``); **avg@k**: the
  mean accuracy of k samples at the configured temperature.
- **shortcut chosen**: share of greedy answers in the shortcut style (the first word): the
  student's *choice* among the teacher's behaviours; **forced stepwise / shortcut**: greedy
  accuracy with the first word forced: its *skill* in each style, apart from the choice.
- **R(l)**, **l·ε(l)**, **ExAccErr**: the two parts of the exposure-bias measure and the measure,
  ExAccErr = (R(l) - l·ε(l)) / (l·ε(l)): R is the KL summed over the student's own prefixes, l·ε
  the same over the teacher's. A lower ExAccErr from a *higher* l·ε is a worse fit, not less
  drift: read it beside both.
- **ESS**, **clipped**: the token weights' effective sample size (Σw)²/(nΣw²) and the fraction of
  Δ clipped, averaged over the steps whose weights are on; **guard**: the fraction of those steps
  at which DisCorD's ESS guard lowered λ.
- **Δ accuracy**: the mean paired difference from the baseline with its 95% paired t interval;
  **beyond noise**: whether the interval excludes 0 (:mod:`.stats`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nemo_dcod.study.stats import paired, spread

__all__ = [
    "METRICS",
    "PAIRED_METRICS",
    "aggregate",
    "cell",
    "identical_start",
    "main_table",
    "paired_table",
    "per_seed_table",
    "render_tables",
]

METRICS: tuple[tuple[str, str, str], ...] = (
    # (summary key of a student's seed, header, format)
    ("accuracy_percent", "accuracy %", "{:.1f}"),
    ("sampled_accuracy_percent", "avg@k %", "{:.1f}"),
    ("shortcut_share_percent", "shortcut chosen %", "{:.1f}"),
    ("forced_stepwise_percent", "forced stepwise %", "{:.1f}"),
    ("forced_shortcut_percent", "forced shortcut %", "{:.1f}"),
    ("exposure_r", "R(l)", "{:.2f}"),
    ("exposure_l_eps", "l·ε(l)", "{:.2f}"),
    ("exaccerr_percent", "ExAccErr %", "{:.0f}"),
    ("ess_mean", "ESS", "{:.3f}"),
    ("clip_fraction_mean", "clipped", "{:.3f}"),
    ("guard_acted_fraction", "guard", "{:.2f}"),
    ("final_train_loss", "train loss", "{:.4f}"),
)
"""Aggregated over seeds (mean, std, n) for every student; the main table shows them in this order."""
PAIRED_METRICS: tuple[str, ...] = (
    "accuracy_percent",
    "sampled_accuracy_percent",
    "forced_stepwise_percent",
    "shortcut_share_percent",
    "exaccerr_percent",
)
"""Compared with the baseline seed by seed (paired t interval, sign count)."""
TEST = (
    "paired by seed: d_s = student - baseline on the same seed; 95% paired t interval mean(d) ± "
    "t_{0.975,n-1}·sd(d)/√n; beyond the seed noise iff the interval excludes 0"
)


def cell(value: float | None, fmt: str) -> str:
    """One number as the tables show it; ``—`` for None or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return fmt.format(value)


def _mean_std(metric: dict[str, Any], fmt: str) -> str:
    if metric["mean"] is None:
        return "—"
    if metric["std"] is None:
        return cell(metric["mean"], fmt)
    return f"{cell(metric['mean'], fmt)} ± {cell(metric['std'], fmt)}"


def identical_start(records: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """How many leading steps every student of a group logged the same loss (to 1e-6 relative).

    ``records``: label -> per step ``(loss, λ)``. Students that compute the same loss while λ = 0
    (SFT and DisCorD on the ce base; kl and DisCorD on the kl base) from one checkpoint and the same
    batches must agree over those steps (up to the order of float sums); other initial weights show
    at step 1, by far more than 1e-6.
    """
    runs = list(records.values())
    equal = 0
    for step in zip(*runs, strict=False):
        if not all(math.isclose(loss, step[0][0], rel_tol=1e-6) for loss, _ in step):
            break
        equal += 1
    expected = 0
    for step in zip(*runs, strict=False):
        if any(lam != 0.0 for _, lam in step):
            break
        expected += 1
    return {
        "students": list(records),
        "equal_steps": equal,
        "expected_equal_steps": expected,
        "identical": equal >= expected,
        "step1_losses": {name: (rs[0][0] if rs else None) for name, rs in records.items()},
    }


def _start_group(section: dict[str, Any]) -> str | None:
    """Which loss a student computes at λ = 0: ``ce`` (SFT), ``kl``, or None (another objective)."""
    name = section.get("name")
    if name == "sft" or (name == "discord" and section.get("base", "ce") == "ce"):
        return "ce"
    if name == "kl" or (name == "discord" and section.get("base") == "kl"):
        return "kl"
    return None


def _identical_starts(
    students: dict[str, dict[int, dict[str, Any]]], sections: dict[str, Any]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    seeds = sorted({s for per_seed in students.values() for s in per_seed})
    for seed in seeds:
        for group in ("ce", "kl"):
            records = {
                label: list(zip(runs[seed]["losses"], runs[seed]["lambdas"], strict=True))
                for label, runs in students.items()
                if seed in runs and _start_group(sections[label]) == group
            }
            if len(records) > 1:
                out[f"seed {seed}, {group}"] = identical_start(records)
    return out


def _student_entry(
    label: str, runs: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    metrics = {key: spread([runs[s].get(key) for s in sorted(runs)]).__dict__ for key, _, _ in METRICS}
    for m in metrics.values():
        m["values"] = list(m["values"])
    comparisons = {
        key: paired(
            {s: r.get(key) for s, r in runs.items()}, {s: r.get(key) for s, r in base.items()}
        ).as_dict()
        for key in PAIRED_METRICS
    }
    keep = [k for k, _, _ in METRICS] + ["accuracy_stepwise_percent", "accuracy_shortcut_percent", "wall_s"]
    return {
        "seeds": sorted(runs),
        "metrics": metrics,
        "paired": comparisons,
        "per_seed": {
            str(s): {k: r.get(k) for k in keep} | {"paths": r["paths"]} for s, r in sorted(runs.items())
        },
        "weight_hist": _summed_hist([r.get("weight_hist") for r in runs.values()]),
    }


def _summed_hist(hists: list[list[float] | None]) -> list[float] | None:
    present = [h for h in hists if h]
    return [float(sum(col)) for col in zip(*present, strict=True)] if present else None


def aggregate(
    sections: dict[str, dict[str, Any]], summaries: dict[str, dict[int, dict[str, Any]]], baseline: str
) -> dict[str, Any]:
    """The students' part of ``summary.json`` from every finished student summary.

    Args:
        sections: label -> loss section, in the config's order.
        summaries: label -> seed -> the student's ``summary.json`` (finished ones only).
        baseline: the baseline's label.
    """
    base = summaries.get(baseline, {})
    students = {
        label: {"loss": sections[label], **_student_entry(label, summaries.get(label, {}), base)}
        for label in sections
    }
    return {"students": students, "identical_start": _identical_starts(summaries, sections)}


def main_table(summary: dict[str, Any]) -> str:
    """One row per student: every metric's mean ± std, and the paired accuracy difference."""
    heads = ["student", "seeds", *(h for _, h, _ in METRICS), "Δ accuracy [95% CI]", "beyond noise"]
    lines = ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    for label, s in summary["students"].items():
        p = s["paired"]["accuracy_percent"]
        diff = "—" if label == summary["baseline"] or p["mean_diff"] is None else _diff_cell(p)
        beyond = (
            "—"
            if p["beyond_noise"] is None or label == summary["baseline"]
            else ("yes" if p["beyond_noise"] else "no")
        )
        cells = [
            label,
            str(len(s["seeds"])),
            *(_mean_std(s["metrics"][k], f) for k, _, f in METRICS),
            diff,
            beyond,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _diff_cell(p: dict[str, Any]) -> str:
    if p["ci_low"] is None:
        return f"{p['mean_diff']:+.1f}"
    return f"{p['mean_diff']:+.1f} [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]"


def per_seed_table(summary: dict[str, Any]) -> str:
    """Greedy held-out accuracy of every student on every seed (eval's own numbers)."""
    seeds = summary["seeds"]
    lines = ["| student | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for label, s in summary["students"].items():
        values = [s["per_seed"].get(str(seed), {}).get("accuracy_percent") for seed in seeds]
        lines.append(f"| {label} | " + " | ".join(cell(v, "{:.1f}") for v in values) + " |")
    return "\n".join(lines) + "\n"


def paired_table(summary: dict[str, Any]) -> str:
    """Every student against the baseline on each paired metric: mean difference, interval, signs."""
    names = {k: h for k, h, _ in METRICS}
    lines = [
        "| student | metric | seeds | mean Δ | 95% CI | better / equal / worse | sign-test p "
        "| beyond noise |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, s in summary["students"].items():
        if label == summary["baseline"]:
            continue
        for key, p in s["paired"].items():
            ci = "—" if p["ci_low"] is None else f"[{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]"
            beyond = "—" if p["beyond_noise"] is None else ("yes" if p["beyond_noise"] else "no")
            mean = "—" if p["mean_diff"] is None else f"{p['mean_diff']:+.1f}"
            signs = f"{p['wins']} / {p['ties']} / {p['losses']}"
            cells = [label, names[key], str(p["n"]), mean, ci, signs, f"{p['sign_p']:.2f}", beyond]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_tables(summary: dict[str, Any]) -> str:
    """``summary.md``: what was run, the three tables, the test used, the identical-start checks."""
    prov = summary["provenance"]
    k = summary["config"]["evaluation"]["num_samples"]
    head = [
        f"# study `{summary['study']}`: task {summary['task']}, start {summary['start']}",
        "",
        f"{len(summary['seeds'])} seed(s) {summary['seeds']}; baseline `{summary['baseline']}`; "
        f"{summary['config']['training']['steps']} steps per student; avg@{k} at temperature "
        f"{summary['config']['evaluation']['temperature']}; {prov['date']}, commit {prov['commit']}, "
        f"{prov['machine']}; wall time {prov['wall_s'] / 60:.1f} min.",
        "",
        "Mean ± std over seeds (sample std).",
        "",
    ]
    starts = [
        f"- {name}: losses equal over the first {v['equal_steps']} steps "
        f"({v['expected_equal_steps']} with λ = 0 for all of {', '.join(v['students'])}): "
        f"{'identical start' if v['identical'] else 'NOT IDENTICAL'}"
        for name, v in summary["identical_start"].items()
    ]
    missing = [f"- {m}" for m in summary["missing"]] or ["- none"]
    return "\n".join(
        [
            *head,
            main_table(summary),
            "## Greedy accuracy per seed (%)",
            "",
            per_seed_table(summary),
            "## Paired comparison with the baseline",
            "",
            f"Test: {TEST}.",
            "",
            paired_table(summary),
            "## Identical starts",
            "",
            *(starts or ["- (no two students compute the same loss at λ = 0)"]),
            "",
            "## Missing (failed or not run)",
            "",
            *missing,
            "",
        ]
    )


def write_json(path: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` (plain JSON; NaN written as null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(clean(summary), indent=1) + "\n")
    tmp.replace(path)
