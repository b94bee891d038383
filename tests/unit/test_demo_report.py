"""The demo's report helpers and run-directory safety (no training needed).

- The table is rendered from the summary's numbers only, with ``—`` for missing values.
- The identical-start check counts the leading steps with equal losses, and stops at the first
  difference.
- A run directory that is not a demo run is never deleted.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from nemo_dcod.demo.pipeline import DemoError, _fresh_run_dir
from nemo_dcod.demo.report import TABLE_COLUMNS, identical_start, table_markdown


def test_table_renders_the_summary_numbers() -> None:
    student = {key: 12.3456 for _, key, _ in TABLE_COLUMNS}
    student["forced_shortcut_percent"] = None
    student["exaccerr_percent"] = math.nan
    table = table_markdown({"students": {"sft": student}})
    header, rule, row = table.strip().splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == len(TABLE_COLUMNS) + 2
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "sft"
    for cell, (_, key, fmt) in zip(cells[1:], TABLE_COLUMNS, strict=True):
        value = student[key]
        assert cell == ("—" if value is None or value != value else fmt.format(value)), key


def test_identical_start_counts_leading_equal_losses() -> None:
    a = [{"loss": x} for x in (3.0, 2.5, 2.0, 1.9)]
    b = [{"loss": x, "lambda": lam} for x, lam in ((3.0, 0.0), (2.5 * (1 + 1e-9), 0.0), (2.1, 0.5), (1.9, 1))]
    out = identical_start({"sft": a, "discord": b})
    assert out["equal_steps"] == 2  # equal to 1e-6, then different at step 3 (step 4's match ignored)
    assert out["expected_equal_steps"] == 2 and out["identical"]  # λ = 0 for both during two steps
    assert out["step1_losses"] == {"sft": 3.0, "discord": 3.0}
    # Other initial weights: the losses part while both students still train plain SFT (λ = 0).
    c = [{"loss": x, "lambda": 0.0} for x in (3.1, 2.5, 2.1, 1.9)]
    apart = identical_start({"sft": a, "discord": c})
    assert apart["equal_steps"] == 0 and apart["expected_equal_steps"] == 4 and not apart["identical"]


def test_a_foreign_run_dir_is_refused_and_a_demo_run_replaced(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(DemoError, match="not a demo run"):
        _fresh_run_dir(foreign)
    assert (foreign / "thesis.tex").read_text() == "keep me"
    demo = tmp_path / "demo"
    _fresh_run_dir(demo)
    (demo / "old.txt").write_text("stale")
    _fresh_run_dir(demo)
    assert not (demo / "old.txt").exists() and (demo / "demo.json").is_file()


def test_demo_config_reports_every_problem_at_once() -> None:
    from nemo_dcod.config import ConfigError, load_config
    from nemo_dcod.demo.config import DemoConfig

    with pytest.raises(ConfigError) as exc:
        load_config(
            DemoConfig,
            None,
            [
                "num_ops=2",  # 5 x 10^2 = 500 problems < 3200 asked for
                "tensor_model_parallel_size=4",
                "seq_length=16",
                "teacher_noise=0",
                "exposure_samples=500",
                "students=[{name: sft}, {name: sft}]",
            ],
        )
    text = str(exc.value)
    for expected in (
        "6 problem(s)",
        "give 500 distinct problems",
        "tensor_model_parallel_size=4",
        "seq_length=16",
        "teacher_noise=0.0",
        "exposure_samples=500",
        "labels ['sft'] repeat",
    ):
        assert expected in text, expected
    reduced = DemoConfig(reduced=True).resolved()
    assert (reduced.num_train_problems, reduced.steps, reduced.exposure_samples) == (300, 8, 16)
    assert DemoConfig().resolved() == DemoConfig()
