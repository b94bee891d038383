"""`nemo-dcod demo reduced=true` end to end (what CI runs), and the consistency of what it writes.

One run of the real command (teacher -> prepare -> one initial checkpoint -> two TP=2 trainings
under torchrun from it -> export -> eval -> ExAccErr -> the study's report), then checks on its
outputs:

- every artifact the report lists exists and its path is printed;
- the printed table, ``summary.md`` and ``summary.json`` agree cell by cell, and the accuracies
  are the eval stage's own ``results.json`` numbers;
- both students started from identical weights: their losses agree exactly while DisCorD's λ is 0
  and differ once it is not (so the check can fail);
- the exported students load with ``transformers.AutoModelForCausalLM`` and give finite logits of
  the tokenizer's size on a task prompt; ExAccErr and the KL are finite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.paths import ROOT

from nemo_dcod.config import load_config
from nemo_dcod.demo.config import DemoConfig
from nemo_dcod.study.report import METRICS

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemo_dcod.cli",
            "demo",
            "--config",
            "conf/demo.yaml",
            f"run_dir={run_dir}",
            "reduced=true",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc.stdout


def _table(text: str) -> dict[str, list[str]]:
    """Rows of the students' main table in ``text`` (the block under ``| student | seeds |``)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| student | seeds |"))
    rows = []
    for line in lines[start + 2 :]:  # after the header and the rule
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return {cells[0]: cells[1:] for cells in rows}


def _summary(run_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((run_dir / "report_demo" / "summary.json").read_text())
    return result


def test_report_exists_and_config_round_trips(demo_run: tuple[Path, str]) -> None:
    run_dir, stdout = demo_run
    summary = _summary(run_dir)
    assert list(summary["students"]) == ["sft", "discord"] and summary["seeds"] == [0]
    for name in ("summary.json", "summary.md", "study.png", "weights.png"):
        path = run_dir / "report_demo" / name
        assert path.is_file() and str(path) in stdout, name  # each report file's path is printed
    for name, student in summary["students"].items():
        paths = student["per_seed"]["0"]["paths"]
        for key in ("train_dir", "checkpoint", "hf_export", "eval_results", "train_log"):
            assert Path(paths[key]).exists(), (name, key)
        assert (Path(paths["train_dir"]) / "metrics.jsonl").is_file()
        assert (Path(paths["hf_export"]) / "config.json").is_file()
    cfg = load_config(DemoConfig, run_dir / "config.yaml")
    assert cfg.reduced and cfg.resolved().steps == 8
    assert summary["config"]["training"]["tensor_model_parallel_size"] == 2


def test_table_json_and_eval_results_agree(demo_run: tuple[Path, str]) -> None:
    run_dir, stdout = demo_run
    summary = _summary(run_dir)
    printed, written = _table(stdout), _table((run_dir / "report_demo" / "summary.md").read_text())
    assert printed == written and set(printed) == set(summary["students"])
    for name, cells in printed.items():
        metrics = summary["students"][name]["metrics"]
        assert cells[0] == "1"  # one seed
        for cell, (key, header, fmt) in zip(cells[1 : 1 + len(METRICS)], METRICS, strict=True):
            value = metrics[key]["mean"]
            assert cell == ("—" if value is None else fmt.format(value)), header  # one seed: no ± std
    for name, student in summary["students"].items():
        run = student["per_seed"]["0"]
        bench = json.loads(Path(run["paths"]["eval_results"]).read_text())["models"][name]["benchmarks"]
        assert run["accuracy_percent"] == pytest.approx(100 * bench["heldout"]["score"], abs=1e-12)
        assert bench["heldout"]["n"] == 32
        assert math.isfinite(run["exaccerr_percent"]) and run["exposure_l_eps"] > 0


def test_students_started_from_identical_weights(demo_run: tuple[Path, str]) -> None:
    run_dir, _ = demo_run
    summary = _summary(run_dir)
    records: dict[str, list[dict[str, Any]]] = {}
    for name, student in summary["students"].items():
        metrics = Path(student["per_seed"]["0"]["paths"]["train_dir"]) / "metrics.jsonl"
        records[name] = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in records["sft"]] == list(range(1, 9)) == [r["step"] for r in records["discord"]]
    zero = [r["step"] for r in records["discord"] if r["lambda"] == 0]
    assert zero and zero == list(range(1, len(zero) + 1)) and len(zero) < 8
    for step in zero:
        assert records["sft"][step - 1]["loss"] == pytest.approx(
            records["discord"][step - 1]["loss"], rel=1e-6
        )
    after = len(zero)  # the first step with λ > 0: DisCorD's weights change its loss
    assert records["sft"][after]["loss"] != pytest.approx(records["discord"][after]["loss"], rel=1e-6)
    same = summary["identical_start"]["seed 0, ce"]
    assert same["identical"] and same["equal_steps"] == len(zero)


def test_exported_students_load_with_transformers(demo_run: tuple[Path, str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = demo_run
    for name, student in _summary(run_dir)["students"].items():
        path = student["per_seed"]["0"]["paths"]["hf_export"]
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "3 + 4 - 2 + 1"}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert ids.shape[1] == 12 and tokenizer.unk_token_id not in ids[0].tolist()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape[-1] >= len(tokenizer) and torch.isfinite(logits).all(), name
