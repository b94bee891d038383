"""The demo's report: ``summary.json``, the table (``summary.md`` and stdout) and ``demo.png``.

The table is rendered from ``summary.json``'s numbers by :func:`table_markdown` and nothing else,
so the printed table and the JSON cannot disagree (the pipeline test checks it from the outside:
it parses the table and compares every cell with the JSON).

What each column means:

- **accuracy**: greedy pass@1 on the held-out problems (exported HF model, ``nemo-dcod eval``).
- **shortcut**: share of the greedy answers that chose the shortcut style (first word); the
  student's choice among the teacher's behaviours, which decides most of its accuracy.
- **forced stepwise / forced shortcut**: greedy accuracy with the first word forced to that style
  (:mod:`.skill`): the student's skill in each style, apart from its choice. ``summary.json`` also
  holds the accuracy within each style as chosen (``accuracy_stepwise_percent``, ...).
- **train loss**: the student's last logged training loss (each loss's own objective: SFT's CE,
  DisCorD's weighted CE; comparable only within a row's history, not across rows).
- **KL teacher pref.**: ε(l), the mean per-step KL(p || q) on teacher prefixes.
- **R(l)**: the summed per-step KL on the student's own prefixes (sampled at temperature 1).
- **ExAccErr**: the exposure-bias measure of :mod:`.exposure`, in percent: R(l) relative to
  l·ε(l). A lower ExAccErr can come from a lower R (less drift) or a higher ε (a worse fit on the
  teacher's prefixes): read it beside both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nemo_dcod.config import to_yaml
from nemo_dcod.demo.config import DemoConfig

__all__ = ["TABLE_COLUMNS", "read_metrics", "table_markdown", "write_report"]

TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (header, summary.json key of a student, format)
    ("accuracy %", "accuracy_percent", "{:.1f}"),
    ("± se", "accuracy_stderr_percent", "{:.1f}"),
    ("shortcut %", "shortcut_share_percent", "{:.1f}"),
    ("forced stepwise %", "forced_stepwise_percent", "{:.1f}"),
    ("forced shortcut %", "forced_shortcut_percent", "{:.1f}"),
    ("train loss", "final_train_loss", "{:.4f}"),
    ("KL teacher pref.", "kl_teacher_prefixes", "{:.4f}"),
    ("R(l)", "exposure_r", "{:.2f}"),
    ("ExAccErr %", "exaccerr_percent", "{:.1f}"),
)
"""The table's columns after the student's name: header, key, format (``—`` for None/NaN)."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The training records (``loss`` present) of a train run's ``metrics.jsonl``, in step order."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return fmt.format(value)


def table_markdown(summary: dict[str, Any]) -> str:
    """The students' table from ``summary["students"]`` (markdown, one row per student)."""
    header = "| student | " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(TABLE_COLUMNS)
    rows = [
        f"| {name} | " + " | ".join(_cell(s.get(key), fmt) for _, key, fmt in TABLE_COLUMNS) + " |"
        for name, s in summary["students"].items()
    ]
    return "\n".join([header, rule, *rows]) + "\n"


def _styles(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of greedy answers per style (first word of the completion) and accuracy within each."""
    by_style: dict[str, list[bool]] = {"stepwise": [], "shortcut": []}
    for record in records:
        sample = record["samples"][0]
        words = str(sample.get("completion", "")).split()
        style = words[0] if words and words[0] in by_style else None
        if style is not None:
            by_style[style].append(bool(sample["correct"]))
    n = len(records)
    return {
        "shortcut_share_percent": 100.0 * len(by_style["shortcut"]) / n if n else None,
        "accuracy_stepwise_percent": 100.0 * sum(by_style["stepwise"]) / len(by_style["stepwise"])
        if by_style["stepwise"]
        else None,
        "accuracy_shortcut_percent": 100.0 * sum(by_style["shortcut"]) / len(by_style["shortcut"])
        if by_style["shortcut"]
        else None,
    }


def identical_start(records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """How many leading steps every student logged the same loss (to 1e-6 relative).

    Same seed, same batches and λ = 0 (DisCorD's warm-up: its weights are exactly 1) make the
    students compute the same thing, up to the order of floating-point sums; a difference in the
    initial weights would show at step 1 (by far more than 1e-6 for random initialisations).
    """
    runs = list(records.values())
    equal = 0
    for step_records in zip(*runs, strict=False):
        first = step_records[0]["loss"]
        if not all(math.isclose(r["loss"], first, rel_tol=1e-6) for r in step_records):
            break
        equal += 1
    # Steps at which every student computes plain SFT (λ = 0, or no λ at all): they must agree.
    expected = 0
    for step_records in zip(*runs, strict=False):
        if any(float(r.get("lambda", 0.0)) != 0.0 for r in step_records):
            break
        expected += 1
    return {
        "equal_steps": equal,
        "expected_equal_steps": expected,
        "identical": equal >= expected,
        "step1_losses": {name: (rs[0]["loss"] if rs else None) for name, rs in records.items()},
    }


def _weight_histogram(records: list[dict[str, Any]]) -> list[float] | None:
    """DisCorD's token-weight histogram summed over the steps with λ > 0 (None for other losses)."""
    hists = [r["weight_hist"] for r in records if "weight_hist" in r and r.get("lambda", 0) > 0]
    if not hists:
        return None
    return [float(sum(col)) for col in zip(*hists, strict=True)]


def _student_summary(
    name: str,
    records: list[dict[str, Any]],
    bench: dict[str, Any],
    measured: dict[str, Any],
    paths: dict[str, str],
) -> dict[str, Any]:
    """One student's row of the summary (accuracy, style choice and skill, exposure, weights)."""
    return {
        "accuracy_percent": 100.0 * bench["score"],
        "accuracy_stderr_percent": 100.0 * bench["stderr"],
        **_styles(bench["records"]),
        "final_train_loss": records[-1]["loss"] if records else None,
        "forced_stepwise_percent": 100.0 * measured["forced_style_accuracy"]["stepwise"],
        "forced_shortcut_percent": 100.0 * measured["forced_style_accuracy"]["shortcut"],
        "kl_teacher_prefixes": measured["exposure"]["epsilon"],
        "exposure_r": measured["exposure"]["r"],
        "exaccerr_percent": measured["exposure"]["exaccerr_percent"],
        "exposure": measured["exposure"],
        "weight_hist": _weight_histogram(records),
        **paths,
    }


def _artifacts(run_dir: Path, checkpoints: dict[str, Path], exports: dict[str, Path]) -> dict[str, Path]:
    return {
        "config": run_dir / "config.yaml",
        "tokenizer": run_dir / "tokenizer",
        "teacher traces": run_dir / "traces.jsonl",
        "held-out problems": run_dir / "heldout.jsonl",
        "store": run_dir / "store",
        "train logs": run_dir / "logs",
        **{f"train {name}": run_dir / name for name in checkpoints},
        **{f"hf export {name}": path for name, path in exports.items()},
        "eval results": run_dir / "eval" / "results.json",
        "eval table": run_dir / "eval" / "results.md",
        "summary": run_dir / "summary.json",
        "table": run_dir / "summary.md",
    }


def _print_summary(summary: dict[str, Any], table: str, artifacts: dict[str, Path]) -> None:
    t, same = summary["teacher"], summary["identical_start"]
    print()
    print(
        f"teacher: {t['traces']} traces, shortcut {t['shortcut']['traces']} "
        f"({t['shortcut']['correct']} correct), stepwise {t['stepwise']['traces']} "
        f"({t['stepwise']['correct']} correct); kept after the filter: shortcut share "
        f"{100 * t['shortcut_share_after_filter']:.1f}%"
    )
    print(table)
    print(
        f"identical start: losses equal over the first {same['equal_steps']} steps of every student "
        f"({same['expected_equal_steps']} with λ = 0 everywhere; step 1: {same['step1_losses']})"
    )
    for label, path in artifacts.items():
        print(f"  {label:<20} {path}")
    print(f"demo: done in {summary['wall_s']:.0f} s")


def write_report(
    run_dir: Path,
    cfg: DemoConfig,
    *,
    teacher_stats: dict[str, Any],
    prepare_report: dict[str, Any],
    checkpoints: dict[str, Path],
    exports: dict[str, Path],
    eval_results: dict[str, Any],
    measured: dict[str, dict[str, Any]],
    wall_s: float,
) -> dict[str, Any]:
    """Write ``summary.json``, ``summary.md`` and ``demo.png``; print the table and every artifact."""
    records_by_student = {name: read_metrics(run_dir / name) for name in checkpoints}
    students = {
        name: _student_summary(
            name,
            records,
            eval_results["models"][name]["benchmarks"]["heldout"],
            measured[name],
            {
                "train_dir": str(run_dir / name),
                "checkpoint": str(checkpoints[name]),
                "hf_export": str(exports[name]),
            },
        )
        for name, records in records_by_student.items()
    }
    summary: dict[str, Any] = {
        "config": json.loads(json.dumps(_plain(cfg))),
        "teacher": teacher_stats,
        "prepare": {k: v for k, v in prepare_report.items() if isinstance(v, int | float | str)},
        "identical_start": identical_start(records_by_student),
        "students": students,
        "wall_s": wall_s,
    }
    artifacts = _artifacts(run_dir, checkpoints, exports)
    curves = {name: [(r["step"], r["loss"]) for r in records] for name, records in records_by_student.items()}
    hists = {name: s["weight_hist"] for name, s in students.items() if s["weight_hist"] is not None}
    plot = _plot(run_dir / "demo.png", students, curves, hists)
    if plot is not None:
        artifacts["plot"] = plot
    summary["artifacts"] = {k: str(v) for k, v in artifacts.items()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = table_markdown(summary)
    (run_dir / "summary.md").write_text(table)
    _print_summary(summary, table, artifacts)
    return summary


def _plain(cfg: DemoConfig) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)))


def _plot(
    path: Path,
    students: dict[str, Any],
    curves: dict[str, list[tuple[int, float]]],
    hists: dict[str, list[float]],
) -> Path | None:
    """Accuracy bars, loss curves, DisCorD weight histogram, ExAccErr(l); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("demo: matplotlib is not installed, no plot (pip install -e '.[eval]').")
        return None
    from nemo_dcod.losses.diagnostics import WEIGHT_HIST_EDGES

    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    names = list(students)
    # Per student: greedy accuracy (its own choice of style), then with each style forced.
    bars = (
        ("greedy", "accuracy_percent"),
        ("forced stepwise", "forced_stepwise_percent"),
        ("forced shortcut", "forced_shortcut_percent"),
    )
    width = 0.8 / len(bars)
    for k, (label, key) in enumerate(bars):
        xs = [i + (k - (len(bars) - 1) / 2) * width for i in range(len(names))]
        axes[0].bar(xs, [students[n][key] or 0.0 for n in names], width=width, label=label)
    axes[0].set_xticks(range(len(names)), names)
    axes[0].set_ylabel("held-out accuracy (%)")
    axes[0].set_ylim(0, 100)
    axes[0].set_title("accuracy: own choice vs style forced")
    axes[0].legend()
    for label, points in curves.items():
        if points:
            axes[1].plot([p[0] for p in points], [p[1] for p in points], label=label)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss")
    axes[1].set_title("loss curves (each student's own objective)")
    axes[1].legend()
    if hists:
        bin_width = WEIGHT_HIST_EDGES[1] - WEIGHT_HIST_EDGES[0]
        for name, hist in hists.items():
            total = sum(hist) or 1.0
            axes[2].bar(
                [e + bin_width / 2 for e in WEIGHT_HIST_EDGES],
                [h / total for h in hist],
                width=bin_width,
                alpha=0.6,
                label=name,
            )
        axes[2].set_xlabel("token weight w (last bin: >= 4)")
        axes[2].set_ylabel("fraction of trained tokens")
        axes[2].legend()
    axes[2].set_title("DisCorD weights (steps with λ > 0)")
    for name in names:
        curve = students[name]["exposure"]["exaccerr_curve"]
        axes[3].plot(range(1, len(curve) + 1), curve, label=name)
    axes[3].axhline(0, color="grey", lw=0.5)
    axes[3].set_xlabel("l (response tokens)")
    axes[3].set_ylabel("ExAccErr(l) (%)")
    axes[3].set_title("exposure bias")
    axes[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
