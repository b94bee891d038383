"""Scores with standard errors, and the three artifacts: results.json, results.md, scores.png.

Scores. For problem i with k graded samples c_i1..c_ik (1 right, 0 wrong), its accuracy is
a_i = mean_j c_ij; a benchmark's score is mean_i a_i over its n problems: *pass@1* when decoding is
greedy (k = 1), *avg@k* when sampling. Its standard error is the sample standard deviation of
the a_i over sqrt(n) (Miller, "Adding Error Bars to Evals", arXiv 2411.00640: problems are the
unit of sampling; the k samples of one problem are not independent draws of the benchmark). With
k > 1, *pass@k* (some sample right) is reported beside it. A model's ``average`` is the unweighted
mean of its benchmark scores (each benchmark counts once, whatever its size).

results.json::

    {"format": "nemo-dcod-eval/1", "models": {LABEL: {
        "path": ..., "backend": ..., "sampling": {...}, "prompt_templates": {NAME: ...}, "grader": ...,
        "average": {"score": ..., "benchmarks": n},
        "benchmarks": {NAME: {"metric": "pass@1" | "avg@k", "score": ..., "stderr": ... | null,
                              "n": ..., "k": ..., "pass_at_k": ..., "no_answer_rate": ...,
                              "truncated_rate": ..., "mean_tokens": ..., "seconds": ...,
                              "records": [{"id", "reference", "accuracy", "samples": [...]}, ...]}}}}}

results.md is a table with one row per benchmark (and ``average``) and one column per model, each
cell ``100·score ± 100·stderr``, written by :func:`markdown_table` from the same numbers; the
plot's bar heights are the same values (:func:`plot_scores` returns them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nemo_dcod.eval.config import EvalError

__all__ = [
    "RESULTS_FORMAT",
    "average_score",
    "format_cell",
    "load_results",
    "markdown_table",
    "merge_models",
    "metric_name",
    "plot_scores",
    "score_benchmark",
    "standard_error",
]

RESULTS_FORMAT = "nemo-dcod-eval/1"


def metric_name(num_samples: int, greedy: bool) -> str:
    """``pass@1`` (greedy) or ``avg@k`` (sampled)."""
    return "pass@1" if greedy else f"avg@{num_samples}"


def standard_error(values: Sequence[float]) -> float | None:
    """Standard error of the mean: sample std (n - 1) / sqrt(n); None below two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(variance / n)


def score_benchmark(correct: Sequence[Sequence[bool]], greedy: bool) -> dict[str, Any]:
    """Score, standard error and pass@k of one benchmark.

    Args:
        correct: per problem, the verdicts of its k samples (every problem has the same k).
        greedy: whether decoding was greedy (names the metric).
    """
    if not correct:
        raise ValueError("score_benchmark: no problems")
    k = len(correct[0])
    if k < 1 or any(len(row) != k for row in correct):
        raise ValueError("score_benchmark: every problem needs the same number (>= 1) of samples")
    accuracy = [sum(row) / k for row in correct]
    return {
        "metric": metric_name(k, greedy),
        "score": sum(accuracy) / len(accuracy),
        "stderr": standard_error(accuracy),
        "n": len(correct),
        "k": k,
        "pass_at_k": sum(any(row) for row in correct) / len(correct),
    }


def average_score(benchmarks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The unweighted mean of the benchmark scores (None without any benchmark)."""
    scores = [b["score"] for b in benchmarks.values()]
    return {"score": sum(scores) / len(scores) if scores else None, "benchmarks": len(scores)}


def format_cell(score: float | None, stderr: float | None = None) -> str:
    """``12.3 ± 4.5`` (percent, one decimal); ``—`` for a missing score."""
    if score is None:
        return "—"
    text = f"{100 * score:.1f}"
    return f"{text} ± {100 * stderr:.1f}" if stderr is not None else text


def _benchmark_names(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for model in models.values():
        names.extend(name for name in model["benchmarks"] if name not in names)
    return names


def markdown_table(models: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per benchmark (and ``average``), one column per model; see the module docstring."""
    labels = list(models)
    lines = [
        "| benchmark | metric | n | " + " | ".join(labels) + " |",
        "|---|---|---:|" + "---:|" * len(labels),
    ]
    for name in _benchmark_names(models):
        entries = [models[label]["benchmarks"].get(name) for label in labels]
        present = [e for e in entries if e is not None]
        metric = "/".join(dict.fromkeys(e["metric"] for e in present))
        n = "/".join(dict.fromkeys(str(e["n"]) for e in present))
        cells = [format_cell(e["score"], e["stderr"]) if e else "—" for e in entries]
        lines.append(f"| {name} | {metric} | {n} | " + " | ".join(cells) + " |")
    averages = [format_cell(models[label]["average"]["score"]) for label in labels]
    lines.append("| average | | | " + " | ".join(averages) + " |")
    return "\n".join(lines) + "\n"


def plot_scores(
    models: Mapping[str, Mapping[str, Any]], path: str | Path
) -> dict[tuple[str, str], float] | None:
    """Grouped bars (benchmarks on x, one bar per model, standard-error whiskers) saved to ``path``.

    Returns:
        ``{(model, benchmark): bar height in percent}`` as drawn, or None when matplotlib is not
        installed (nothing is written then).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    labels = list(models)
    names = _benchmark_names(models)
    width = 0.8 / max(len(labels), 1)
    fig = Figure(figsize=(max(6.0, 1.2 * len(names) * max(len(labels), 1) ** 0.5 + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    heights: dict[tuple[str, str], float] = {}
    for m, label in enumerate(labels):
        entries = [models[label]["benchmarks"].get(name) for name in names]
        xs = [i + (m - (len(labels) - 1) / 2) * width for i, e in enumerate(entries) if e is not None]
        ys = [100 * e["score"] for e in entries if e is not None]
        errs = [100 * (e["stderr"] or 0.0) for e in entries if e is not None]
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=3, label=label)
        ax.bar_label(bars, fmt="%.1f", padding=2, fontsize="x-small")
        drawn = [name for name, e in zip(names, entries, strict=True) if e is not None]
        for name, bar in zip(drawn, bars.patches, strict=True):
            heights[(label, name)] = float(bar.get_height())
    ax.set_xticks(range(len(names)), names)
    metrics = sorted({b["metric"] for model in models.values() for b in model["benchmarks"].values()})
    ax.set_ylabel(f"{'/'.join(metrics)} (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    return heights


def load_results(path: str | Path) -> dict[str, Any]:
    """A results.json written by ``nemo-dcod eval``.

    Raises:
        EvalError: a missing file, not JSON, or not this format.
    """
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"compare_with: {p}: no such file (a results.json of an earlier eval run).")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise EvalError(f"compare_with: {p}: not JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT or "models" not in data:
        raise EvalError(f"compare_with: {p}: not a results.json of nemo-dcod eval (format {RESULTS_FORMAT}).")
    return data


def merge_models(sources: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The models of several results, in order, each label once.

    Args:
        sources: ``(where, models)`` pairs; ``where`` names the source in errors.

    Raises:
        EvalError: two sources with the same model label.
    """
    merged: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for where, models in sources:
        for label, model in models.items():
            if label in merged:
                raise EvalError(
                    f"model label {label!r} is in both {seen[label]} and {where}: give one a different "
                    "label (models[i].label) so both can be shown."
                )
            merged[label] = model
            seen[label] = where
    return merged
