"""The study's report helpers, its seed statistics, and run-directory safety (no training needed).

- The tables are rendered from the summary's numbers only (``mean ± std``, ``—`` for missing).
- The identical-start check counts the leading steps with equal losses, and stops at the first
  difference.
- The paired t interval and sign test equal a float64 reference (scipy's t quantiles where scipy
  is installed) and say "beyond noise" exactly when the interval excludes 0.
- A run directory that is not a demo's or a study's is never deleted; a demo run is replaced.
- The demo's and the study's configs report every problem at once.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest

from nemo_dcod.study.demo import DemoError, fresh_run_dir, study_of
from nemo_dcod.study.report import METRICS, aggregate, identical_start, main_table, per_seed_table
from nemo_dcod.study.stats import paired, sign_test_p, spread, t_critical


def _run(seed: int, acc: float, **extra: float | None) -> dict[str, object]:
    run: dict[str, object] = {key: 10.0 + seed for key, _, _ in METRICS}
    run.update(accuracy_percent=acc, forced_shortcut_percent=None, exaccerr_percent=math.nan, paths={})
    run.update(losses=[3.0, 2.0], lambdas=[0.0, 0.0], **extra)
    return run


def test_tables_render_the_summary_numbers() -> None:
    sections = {"sft": {"name": "sft"}, "discord": {"name": "discord", "tau": 0.5}}
    runs = {
        "sft": {0: _run(0, 20.0), 1: _run(1, 24.0), 2: _run(2, 22.0)},
        "discord": {0: _run(0, 26.0), 1: _run(1, 29.0), 2: _run(2, 28.0)},
    }
    summary = {"baseline": "sft", "seeds": [0, 1, 2], **aggregate(sections, runs, "sft")}
    header, rule, *rows = main_table(summary).strip().splitlines()
    heads = [c.strip() for c in header.strip("|").split("|")]
    assert heads[2 : 2 + len(METRICS)] == [h for _, h, _ in METRICS] and rule.count("|") == len(heads) + 1
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows}
    acc = cells["discord"][2]
    assert acc == "27.7 ± 1.5"  # mean 27.667, sample std 1.528
    assert cells["discord"][heads.index("forced shortcut %")] == "—"  # None on every seed
    assert cells["discord"][heads.index("ExAccErr %")] == "—"  # NaN on every seed
    # Differences 6, 5, 6: mean 5.667, sd 0.577, t(2) = 4.303 -> half-width 1.434.
    assert cells["discord"][-2:] == ["+5.7 [+4.2, +7.1]", "yes"]
    assert cells["sft"][-2:] == ["—", "—"]
    per_seed = per_seed_table(summary).strip().splitlines()
    assert per_seed[3] == "| discord | 26.0 | 29.0 | 28.0 |"


def test_identical_start_counts_leading_equal_losses() -> None:
    a = [(3.0, 0.0), (2.5, 0.0), (2.0, 0.0), (1.9, 0.0)]
    b = [(3.0, 0.0), (2.5 * (1 + 1e-9), 0.0), (2.1, 0.5), (1.9, 1.0)]
    out = identical_start({"sft": a, "discord": b})
    assert out["equal_steps"] == 2  # equal to 1e-6, then different at step 3 (step 4's match ignored)
    assert out["expected_equal_steps"] == 2 and out["identical"]
    assert out["step1_losses"] == {"sft": 3.0, "discord": 3.0}
    c = [(3.1, 0.0), (2.5, 0.0), (2.1, 0.0), (1.9, 0.0)]
    apart = identical_start({"sft": a, "discord": c})
    assert apart["equal_steps"] == 0 and apart["expected_equal_steps"] == 4 and not apart["identical"]


def test_paired_interval_and_sign_test_against_a_reference() -> None:
    student, base = {0: 30.0, 1: 22.5, 2: 27.0, 3: 40.0}, {0: 24.0, 1: 24.0, 2: 21.0, 3: 31.0, 4: 5.0}
    p = paired(student, base)
    diffs = [6.0, -1.5, 6.0, 9.0]  # seed 4 has no student value: left out
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    assert p.n == 4 and p.diffs == tuple(diffs)
    assert p.mean_diff == pytest.approx(mean, abs=1e-12) and p.sd_diff == pytest.approx(sd, abs=1e-12)
    assert p.ci_low == pytest.approx(mean - 3.182 * sd / 2, abs=1e-12)
    assert (p.wins, p.ties, p.losses) == (3, 0, 1) and p.sign_p == pytest.approx(0.625)
    assert p.beyond_noise is (p.ci_low > 0)
    same = paired({0: 5.0, 1: 6.0}, {0: 5.0, 1: 6.0})
    assert same.mean_diff == 0 and same.beyond_noise is False and same.ties == 2
    one = paired({0: 5.0}, {0: 1.0})
    assert one.beyond_noise is None and one.ci_low is None and one.mean_diff == 4.0
    assert (
        sign_test_p(3, 0) == 0.25
        and sign_test_p(0, 0) == 1.0
        and sign_test_p(10, 0) == pytest.approx(2 / 1024)
    )
    s = spread([1.0, None, math.nan, 3.0])
    assert (s.mean, s.n, s.values) == (2.0, 2, (1.0, 3.0)) and s.std == pytest.approx(math.sqrt(2))
    assert spread([4.0]).std is None and spread([]).mean is None


def test_t_quantiles_equal_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 31):
        assert t_critical(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=6e-4), df
    with pytest.raises(ValueError, match="two seeds"):
        t_critical(0)


def test_a_foreign_run_dir_is_refused_and_a_demo_run_replaced(tmp_path: Path) -> None:
    from nemo_dcod.study.config import StudyConfig, StudyError
    from nemo_dcod.study.run import run_study

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(DemoError, match="not a demo run"):
        fresh_run_dir(foreign)
    with pytest.raises(StudyError, match="not a study's folder"):
        run_study(StudyConfig(run_dir=str(foreign)))
    assert (foreign / "thesis.tex").read_text() == "keep me"
    demo = tmp_path / "demo"
    fresh_run_dir(demo)
    (demo / "old.txt").write_text("stale")
    fresh_run_dir(demo)
    assert (
        not (demo / "old.txt").exists() and (demo / "demo.json").is_file() and (demo / "study.json").is_file()
    )


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
    study = study_of(DemoConfig(), tmp_path_of_demo := Path("/x"))
    assert study.run_dir == str(tmp_path_of_demo) and study.seeds == [0] and study.problems() == []
    assert study.task.resolved() == study.task  # the demo spells out every task value


def test_study_config_reports_every_problem_at_once() -> None:
    from nemo_dcod.config import ConfigError, load_config
    from nemo_dcod.study.config import StudyConfig

    with pytest.raises(ConfigError) as exc:
        load_config(
            StudyConfig,
            None,
            [
                "task.preset=nope",
                "task.num_ops=1",
                "seeds=[1, 1]",
                "baseline=teacher",
                "training.tensor_model_parallel_size=4",
                "evaluation.num_samples=-1",
                "start.warm_num_ops=[0]",
                "students=[{name: sft, label: 'a b'}, {name: discord, tau: 0}]",
            ],
        )
    text = str(exc.value)
    for expected in (
        "task.preset='nope'",
        "give 50 distinct problems",
        "seeds=[1, 1]",
        "baseline='teacher'",
        "training.tensor_model_parallel_size=4",
        "evaluation.num_samples=-1",
        "start.warm_num_ops=[0]",
        "label 'a b'",
        "students[1].tau=0.0",
    ):
        assert expected in text, expected
    long = load_config(StudyConfig, None, ["task.preset=long_chain", "reduced=true"]).resolved()
    assert (long.task.num_ops, long.task.shortcut_prob, long.task.seq_length) == (8, 0.0, 160)
    assert (long.task.num_train_problems, long.training.steps, long.start.warm_steps) == (300, 8, 8)
    assert long.start.lengths(8) == [1, 2, 3, 4] and long.start.lengths(3) == [1, 2]


def test_one_study_at_a_time_per_run_dir(tmp_path: Path) -> None:
    from nemo_dcod.study.config import StudyError
    from nemo_dcod.study.run import _lock

    held = _lock(tmp_path)
    with pytest.raises(StudyError, match=f"another study is running there \\(pid {os.getpid()}\\)"):
        _lock(tmp_path)
    held.close()
    _lock(tmp_path).close()  # released: the next study may start


def test_held_out_selection_takes_the_best_and_the_best_discord() -> None:
    from nemo_dcod.study.select import choose

    def entry(name: str, acc: float, skill: float) -> dict[str, object]:
        metric = {"mean": acc, "std": 1.0}
        return {
            "loss": {"name": name},
            "seeds": [0, 1, 2],
            "metrics": {"accuracy_percent": metric, "forced_stepwise_percent": {"mean": skill}},
        }

    report = {
        "task": "styles",
        "start": "random",
        "baseline": "sft",
        "students": {
            "sft": entry("sft", 30.0, 0),
            "todi": entry("todi", 21.0, 90),
            "kl": entry("kl", 21.0, 95),
        },
    }
    other = {
        **report,
        "students": {"discord_t05": entry("discord", 19.0, 10), "discord": entry("discord", 17.0, 50)},
    }
    baseline, chosen = choose([report, other])
    assert baseline == "sft" and [label for label, _ in chosen] == ["kl", "discord_t05"]  # tie -> skill
    other["students"]["discord_min"] = entry("discord", 25.0, 0)
    assert [label for label, _ in choose([report, other])[1]] == ["discord_min"]  # the best is a DisCorD
    with pytest.raises(ValueError, match="different tasks"):
        choose([report, {**other, "start": "warm"}])


def test_training_shuffle_reaches_every_training_and_is_keyed_only_when_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``training.shuffle=false`` (store order, as before 2026-12-07) makes other seed and student
    folders and reaches the train config; the default keeps the folders made before the field."""
    from nemo_dcod.config import load_config
    from nemo_dcod.study import run
    from nemo_dcod.study.config import StudyConfig
    from nemo_dcod.study.launch import train_config

    on = load_config(StudyConfig, None, ["run_dir=/r", "start.kind=warm"]).resolved()
    off = load_config(
        StudyConfig, None, ["run_dir=/r", "start.kind=warm", "training.shuffle=false"]
    ).resolved()
    section = {"label": "sft", "name": "sft"}
    assert run.seed_dir(on, 0) != run.seed_dir(off, 0)
    assert run.student_dir(on, 0, section) != run.student_dir(off, 0, section)
    keyed: list[str] = []
    key = run._key
    monkeypatch.setattr(run, "_key", lambda obj: keyed.append(repr(obj)) or key(obj))
    run.student_dir(on, 0, section)  # keys the seed's content, then the student's
    assert len(keyed) == 2 and not any("shuffle" in k for k in keyed), keyed
    run.student_dir(off, 0, section)
    assert all("'shuffle': False" in k for k in keyed[2:]), keyed
    kwargs: dict[str, Any] = dict(
        seed=0, vocab_size=32, seq_length=16, steps=2, global_batch_size=2, lr=1e-3, tp=1
    )
    assert train_config(Path("/r"), Path("/s"), loss={"name": "sft"}, **kwargs).data.shuffle is True
    cfg = train_config(Path("/r"), Path("/s"), loss={"name": "sft"}, shuffle=False, **kwargs)
    assert cfg.data.shuffle is False


def test_demo_verdict_states_the_win_and_its_caveats_or_that_nothing_was_compared() -> None:
    import json

    from nemo_dcod.study.demo import verdict

    def seed(accuracy: float, shortcut: float, skill: float) -> dict[str, Any]:
        keys = ("accuracy_percent", "shortcut_share_percent", "forced_stepwise_percent")
        return {"per_seed": {"0": dict(zip(keys, (accuracy, shortcut, skill), strict=True))}}

    summary = {
        "baseline": "sft",
        "seeds": [0],
        "students": {"sft": seed(14.5, 100.0, 100.0), "discord": seed(100.0, 0.0, 100.0)},
    }
    text = verdict(summary)
    assert "discord beats sft: greedy accuracy 100.0% vs 14.5% (+85.5)" in text, text
    assert "one seed, no interval" in text
    unlearned = json.loads(json.dumps(summary))
    unlearned["students"]["sft"]["per_seed"]["0"]["forced_stepwise_percent"] = 40.0
    text = verdict(unlearned)
    assert "never learned" in text and "beats" not in text, text
    tied = json.loads(json.dumps(summary))
    tied["students"]["discord"]["per_seed"]["0"]["accuracy_percent"] = 16.0
    assert "discord matches sft" in verdict(tied)
