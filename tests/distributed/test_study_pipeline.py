"""``nemo-dcod study`` in reduced mode, end to end: 2 seeds, 3 students, the real pipeline.

The long-chain task from a warm start (the demo's test covers the two-style task from a random
one): per seed a textbook corpus -> prepare -> an 8-step SFT warm-up, the one checkpoint every
student loads; the teacher's traces -> prepare -> the exact top-k; per student ``nemo-dcod train``
(TP=1, two jobs at a time) -> export -> greedy and sampled eval -> forced-style skill, ExAccErr.

Two invocations share the run_dir: the first trains SFT and a DisCorD student with λ_max = 0, the
second adds a DisCorD student with the ESS guard. Checks:

- every artifact exists (the report in run_dir and its copy in results_dir, every path printed);
- the main table's and the per-seed table's numbers equal summary.json's, in summary.md and as
  printed; per-seed accuracies (greedy and avg@k) equal the eval stage's results.json;
- resume: the second run runs exactly the two new jobs; the first run's students and seeds are not
  touched (their summary.json, prep.json and checkpoints keep their modification times);
- the λ = 0 student is bit-identical to SFT (every exported tensor, every step's loss, every
  completion) while the guarded student is not, and its guard acted (metrics.jsonl).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.paths import ROOT

from nemo_dcod.study.report import METRICS

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
FIRST = "[{name: sft}, {label: discord_l0, name: discord, lambda_max: 0.0}]"
SECOND = FIRST[:-1] + (
    ", {label: discord, name: discord, tau: 0.25, ess_floor: 0.9, lambda_warmup_fraction: 0.25}]"
)


def _study(run_dir: Path, results: Path, students: str) -> str:
    args = [
        "study",
        "name=reduced",
        f"run_dir={run_dir}",
        f"results_dir={results}",
        "reduced=true",
        "seeds=[0, 1]",
        "task.preset=long_chain",
        "start.kind=warm",
        f"students={students}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_dcod.cli", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def _times(run_dir: Path) -> dict[str, float]:
    files = [*run_dir.glob("students/*/*/summary.json"), *run_dir.glob("seeds/*/prep.json")]
    files += list(run_dir.glob("students/*/*/train/checkpoints/*/weights/*"))
    return {str(p): p.stat().st_mtime_ns for p in files}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("study")
    run_dir, results = base / "run", base / "results"
    first = _study(run_dir, results, FIRST)
    before = _times(run_dir)
    second = _study(run_dir, results, SECOND)
    summary = json.loads((run_dir / "report_reduced" / "summary.json").read_text())
    return {
        "run_dir": run_dir,
        "results": results,
        "first": first,
        "second": second,
        "before": before,
        "summary": summary,
    }


def _rows(text: str, head: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(head))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def _number(cell: str, value: float | None, fmt: str) -> None:
    """A table cell shows ``value`` in ``fmt`` (``—`` for None)."""
    if value is None:
        assert cell == "—"
    else:
        assert float(cell) == pytest.approx(float(fmt.format(value)), abs=0), cell


def test_every_artifact_exists_and_is_printed(study: dict[str, Any]) -> None:
    run_dir, summary, out = study["run_dir"], study["summary"], study["second"]
    report = run_dir / "report_reduced"
    published = next(study["results"].glob("study_reduced_*"))
    for name in ("summary.json", "summary.md", "study.png", "weights.png"):
        assert (report / name).stat().st_size > 0 and str(report / name) in out, name
        assert (published / name).read_bytes() == (report / name).read_bytes(), name
    assert str(published) in out
    assert list(summary["students"]) == ["sft", "discord_l0", "discord"] and summary["seeds"] == [0, 1]
    assert summary["missing"] == [] and summary["start"] == "warm" and summary["task"] == "long_chain"
    for s in summary["seed_info"].values():
        assert s["start"]["kind"] == "warm" and s["teacher"]["shortcut"]["traces"] == 0
    for student in summary["students"].values():
        for run in student["per_seed"].values():
            for key, path in run["paths"].items():
                assert path is not None and Path(path).exists(), key
    assert summary["provenance"]["commit"] and summary["provenance"]["wall_s"] > 0


def test_tables_show_the_json_numbers(study: dict[str, Any]) -> None:
    summary = study["summary"]
    written = (study["run_dir"] / "report_reduced" / "summary.md").read_text()
    for text in (written, study["second"]):
        main = _rows(text, "| student | seeds |")
        assert list(main) == list(summary["students"])
        for label, cells in main.items():
            student = summary["students"][label]
            assert cells[0] == "2"
            for cell, (key, header, fmt) in zip(cells[1 : 1 + len(METRICS)], METRICS, strict=True):
                m = student["metrics"][key]
                if m["mean"] is None:
                    assert cell == "—", header
                    continue
                mean, std = cell.split(" ± ")
                _number(mean, m["mean"], fmt)
                _number(std, m["std"], fmt)
            p = student["paired"]["accuracy_percent"]
            if label != "sft":
                low, high = re.findall(r"[+-]\d+\.\d", cells[-2])[1:]
                assert (float(low), float(high)) == (round(p["ci_low"], 1), round(p["ci_high"], 1))
                assert cells[-1] == ("yes" if p["beyond_noise"] else "no")
        per_seed = _rows(text, "| student | seed 0 |")
        for label, cells in per_seed.items():
            runs = summary["students"][label]["per_seed"]
            for cell, seed in zip(cells, ("0", "1"), strict=True):
                _number(cell, runs[seed]["accuracy_percent"], "{:.1f}")


def test_per_seed_accuracies_are_evals_own_numbers(study: dict[str, Any]) -> None:
    for label, student in study["summary"]["students"].items():
        values = []
        for run in student["per_seed"].values():
            greedy = json.loads(Path(run["paths"]["eval_results"]).read_text())["models"][label]
            sampled = json.loads(Path(run["paths"]["eval_sampled_results"]).read_text())["models"][label]
            assert run["accuracy_percent"] == 100 * greedy["benchmarks"]["heldout"]["score"]
            assert run["sampled_accuracy_percent"] == 100 * sampled["benchmarks"]["heldout"]["score"]
            assert sampled["benchmarks"]["heldout"]["metric"] == "avg@2"
            assert math.isfinite(run["exaccerr_percent"]) and run["exposure_l_eps"] > 0
            values.append(run["accuracy_percent"])
        m = student["metrics"]["accuracy_percent"]
        assert m["values"] == values and m["mean"] == pytest.approx(sum(values) / 2, abs=1e-12)


def test_resume_runs_only_the_new_students(study: dict[str, Any]) -> None:
    assert "6 job(s) to run" in study["first"]  # 2 seeds' preps + 2 students x 2 seeds
    assert "2 job(s) to run" in study["second"]  # the new student on each seed, nothing else
    started = re.findall(r"start (\S+) \(log", study["second"])
    assert sorted(s.split("-")[0] for s in started) == ["seed_0_discord", "seed_1_discord"]
    after = _times(study["run_dir"])
    assert study["before"] and all(after[path] == t for path, t in study["before"].items())


def test_lambda_zero_is_bit_identical_to_sft_and_the_guard_acts(study: dict[str, Any]) -> None:
    import torch
    from safetensors.torch import load_file

    students = study["summary"]["students"]
    for seed in ("0", "1"):
        runs = {label: s["per_seed"][seed]["paths"] for label, s in students.items()}
        weights = {
            label: load_file(str(next(Path(p["hf_export"]).glob("*.safetensors"))))
            for label, p in runs.items()
        }
        assert set(weights["sft"]) == set(weights["discord_l0"])
        assert all(torch.equal(weights["sft"][k], weights["discord_l0"][k]) for k in weights["sft"])
        assert not all(torch.equal(weights["sft"][k], weights["discord"][k]) for k in weights["sft"])
        metrics = {
            label: [json.loads(x) for x in (Path(p["train_dir"]) / "metrics.jsonl").read_text().splitlines()]
            for label, p in runs.items()
        }
        assert [r["loss"] for r in metrics["sft"]] == [r["loss"] for r in metrics["discord_l0"]]
        completions = {
            label: [
                r["samples"]
                for r in json.loads(Path(p["eval_results"]).read_text())["models"][label]["benchmarks"][
                    "heldout"
                ]["records"]
            ]
            for label, p in runs.items()
        }
        assert completions["sft"] == completions["discord_l0"]
        guarded = [r for r in metrics["discord"] if r["lambda_scheduled"] > 0]
        assert guarded and all(0 < r["gate_ess"] <= 1 for r in guarded)
        acted = [r for r in guarded if r["guard_scale"] < 1]
        assert acted and all(
            r["lambda"] == pytest.approx(r["lambda_scheduled"] * r["guard_scale"]) for r in acted
        )
        assert students["discord"]["per_seed"][seed]["guard_acted_fraction"] == len(acted) / len(guarded)
    same = study["summary"]["identical_start"]["seed 0, ce"]
    assert same["identical"] and same["expected_equal_steps"] >= 2
