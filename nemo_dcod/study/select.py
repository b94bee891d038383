"""Settings chosen on validation seeds, for a study on held-out seeds.

``python -m nemo_dcod.study.select --reports A/summary.json B/summary.json --name X --out conf/study_X.yaml``

The rule, fixed before the held-out seeds are run: among the validation reports' students (all of
one task and start), rank every student other than the baseline by its mean greedy held-out
accuracy over the validation seeds (ties: the higher mean accuracy with the stepwise style forced,
then the label). The held-out study trains the baseline, the best student, and the best DisCorD
student when the best is not one, on the held-out seeds, with every other setting of the first
report's config. What the held-out study then reports is the only evidence for a recommendation:
the validation ranking chose among many settings and is biased upward.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["choose", "heldout_config", "main"]


def _rank_key(item: tuple[str, dict[str, Any]]) -> tuple[float, float, str]:
    label, student = item
    acc = student["metrics"]["accuracy_percent"]["mean"]
    skill = student["metrics"]["forced_stepwise_percent"]["mean"]
    return (-(acc if acc is not None else -1.0), -(skill if skill is not None else -1.0), label)


def choose(reports: list[dict[str, Any]]) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """The baseline's label and the chosen students ``(label, entry)``: the best, and the best DisCorD.

    Raises:
        ValueError: reports of different tasks, starts or baselines, or no student besides the baseline.
    """
    firsts = {(r["task"], r["start"], r["baseline"]) for r in reports}
    if len(firsts) != 1:
        raise ValueError(f"reports of different tasks / starts / baselines: {sorted(firsts)}")
    baseline = reports[0]["baseline"]
    students: dict[str, dict[str, Any]] = {}
    for report in reports:
        for label, entry in report["students"].items():
            if label != baseline and entry["seeds"]:
                students.setdefault(label, entry)
    if not students:
        raise ValueError("no finished student besides the baseline in these reports")
    ranked = sorted(students.items(), key=_rank_key)
    chosen = [ranked[0]]
    if ranked[0][1]["loss"].get("name") != "discord":
        chosen += [item for item in ranked if item[1]["loss"].get("name") == "discord"][:1]
    return baseline, chosen


def _relative(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it (configs run from the checkout)."""
    import os

    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def heldout_config(reports: list[dict[str, Any]], seeds: list[int], name: str, command_path: str) -> str:
    """The held-out study's YAML (first line: its command)."""
    import yaml

    baseline, chosen = choose(reports)
    config = dict(reports[0]["config"])
    base_section = reports[0]["students"][baseline]["loss"]
    ranking = [
        f"#   {label}: accuracy {e['metrics']['accuracy_percent']['mean']:.1f} ± "
        f"{e['metrics']['accuracy_percent']['std'] or 0:.1f} on seeds {e['seeds']}"
        for label, e in chosen
    ]
    config.update(
        name=name,
        seeds=seeds,
        reduced=False,
        students=[base_section, *(e["loss"] for _, e in chosen)],
        run_dir=_relative(config["run_dir"]),
        results_dir=_relative(config["results_dir"]) if config.get("results_dir") else None,
    )
    head = [
        f"# nemo-dcod study --config {command_path}",
        f"# Held-out seeds {seeds} of task {reports[0]['task']} from a {reports[0]['start']} start:",
        "# the baseline and the settings chosen on the validation seeds by nemo_dcod.study.select",
        "# (the best mean greedy accuracy, and the best DisCorD setting when the best is not one):",
        *ranking,
        f"# Chosen from: {', '.join(r['study'] for r in reports)}.",
    ]
    return "\n".join(head) + "\n" + yaml.safe_dump(config, sort_keys=False, width=200)


def main(argv: list[str] | None = None) -> int:
    """Write the held-out config chosen from validation reports."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reports", nargs="+", required=True, help="validation reports' summary.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5], help="held-out seeds")
    parser.add_argument("--name", required=True, help="the held-out study's name")
    parser.add_argument("--out", required=True, help="the YAML to write (conf/study_<name>.yaml)")
    args = parser.parse_args(argv)
    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    text = heldout_config(reports, args.seeds, args.name, args.out)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
