"""A study's plots, drawn from ``summary.json`` (and the students' own summaries for loss curves).

``study.png``: (1) greedy accuracy and forced-stepwise skill per student, mean ± std with every
seed as a dot; (2) choice against skill: shortcut chosen vs forced-stepwise accuracy, one point
per student and seed; (3) the exposure parts R(l) and l·ε(l); (4) the paired accuracy difference
from the baseline with its 95% interval. ``weights.png``: the token-weight histograms (steps with
weights on, all seeds) and the first seed's loss curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_study"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study: matplotlib is not installed, no plots (pip install -e '.[eval]').")
        return None
    return plt


def _bars(ax: Any, summary: dict[str, Any]) -> None:
    labels = list(summary["students"])
    for offset, (key, name) in (
        (-0.2, ("accuracy_percent", "greedy")),
        (0.2, ("forced_stepwise_percent", "forced stepwise")),
    ):
        means = [summary["students"][s]["metrics"][key]["mean"] or 0.0 for s in labels]
        stds = [summary["students"][s]["metrics"][key]["std"] or 0.0 for s in labels]
        xs = [i + offset for i in range(len(labels))]
        ax.bar(xs, means, width=0.4, yerr=stds, capsize=2, label=name, alpha=0.8)
        for x, s in zip(xs, labels, strict=True):
            values = summary["students"][s]["metrics"][key]["values"]
            ax.scatter([x] * len(values), values, s=8, color="black", zorder=3)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("accuracy (own choice) and skill (stepwise forced)")
    ax.legend(fontsize=7)


def _choice_vs_skill(ax: Any, summary: dict[str, Any]) -> None:
    for label, s in summary["students"].items():
        xs, ys = [], []
        for run in s["per_seed"].values():
            if (
                run.get("shortcut_share_percent") is not None
                and run.get("forced_stepwise_percent") is not None
            ):
                xs.append(run["shortcut_share_percent"])
                ys.append(run["forced_stepwise_percent"])
        if xs:
            ax.scatter(xs, ys, s=14, label=label)
    ax.set_xlabel("shortcut chosen (%)")
    ax.set_ylabel("accuracy, stepwise forced (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.set_title("choice vs skill (one point per seed)")
    ax.legend(fontsize=6, ncol=2)


def _exposure(ax: Any, summary: dict[str, Any]) -> None:
    labels = list(summary["students"])
    for offset, key, name in (
        (-0.2, "exposure_r", "R(l): own prefixes"),
        (0.2, "exposure_l_eps", "l·ε(l): teacher prefixes"),
    ):
        means = [summary["students"][s]["metrics"][key]["mean"] or 0.0 for s in labels]
        stds = [summary["students"][s]["metrics"][key]["std"] or 0.0 for s in labels]
        ax.bar([i + offset for i in range(len(labels))], means, width=0.4, yerr=stds, capsize=2, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("summed KL(p || q) over l steps")
    ax.set_title("exposure bias: its two parts")
    ax.legend(fontsize=7)


def _paired(ax: Any, summary: dict[str, Any]) -> None:
    labels = [s for s in summary["students"] if s != summary["baseline"]]
    for i, label in enumerate(labels):
        p = summary["students"][label]["paired"]["accuracy_percent"]
        if p["mean_diff"] is None:
            continue
        if p["ci_low"] is not None:
            ax.errorbar(
                [i],
                [p["mean_diff"]],
                yerr=[[p["mean_diff"] - p["ci_low"]], [p["ci_high"] - p["mean_diff"]]],
                fmt="o",
                capsize=3,
                color="C3" if p["beyond_noise"] else "C0",
            )
        ax.scatter([i] * len(p["diffs"]), p["diffs"], s=8, color="black", zorder=3)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(f"accuracy - {summary['baseline']} (points)")
    ax.set_title("paired by seed, 95% t interval (red: beyond noise)")


def _weights(summary: dict[str, Any], curves: dict[str, list[float]], path: Path, plt: Any) -> None:
    from nemo_dcod.losses.diagnostics import WEIGHT_HIST_EDGES

    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    width = WEIGHT_HIST_EDGES[1] - WEIGHT_HIST_EDGES[0]
    for label, s in summary["students"].items():
        hist = s.get("weight_hist")
        if hist and sum(hist[1:]) + sum(hist[:3]) > 0 and s["loss"].get("name") != "sft":
            total = sum(hist) or 1.0
            axes[0].step(
                [e + width / 2 for e in WEIGHT_HIST_EDGES],
                [h / total for h in hist],
                where="mid",
                label=label,
            )
    axes[0].set_xlabel("token weight w (last bin: >= 4)")
    axes[0].set_ylabel("fraction of trained tokens")
    axes[0].set_title("token weights (steps with weights on, all seeds)")
    axes[0].legend(fontsize=6)
    for label, losses in curves.items():
        axes[1].plot(range(1, len(losses) + 1), losses, label=label, lw=0.8)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss (each student's own objective)")
    axes[1].set_title(f"loss curves, seed {summary['seeds'][0]}")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_study(summary: dict[str, Any], curves: dict[str, list[float]], out_dir: Path) -> list[Path]:
    """Write ``study.png`` and ``weights.png`` into ``out_dir``; the files (none without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    _bars(axes[0], summary)
    _choice_vs_skill(axes[1], summary)
    _exposure(axes[2], summary)
    _paired(axes[3], summary)
    fig.tight_layout()
    fig.savefig(out_dir / "study.png", dpi=100)
    plt.close(fig)
    _weights(summary, curves, out_dir / "weights.png", plt)
    return [out_dir / "study.png", out_dir / "weights.png"]
