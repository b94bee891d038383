"""The eval stage end to end on tiny random Llamas (the shipped conf/eval_tiny.yaml), comparison
mode, scoring with known verdicts, left-padded batching, and config/input errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from helpers.paths import ROOT

from nemo_dcod.config import ConfigError, load_config
from nemo_dcod.eval.benchmarks import Problem
from nemo_dcod.eval.config import EvalConfig, EvalError, SamplingSection
from nemo_dcod.eval.generation import Completion, SamplingParams
from nemo_dcod.eval.grading import Grader
from nemo_dcod.eval.report import format_cell, markdown_table, plot_scores, score_benchmark, standard_error
from nemo_dcod.eval.run import grade_completions, run_eval

CONF = ROOT / "conf/eval_tiny.yaml"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from helpers.hf_tiny import make_hf_checkpoint

    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_checkpoint(root / name, "llama", seed=seed) for name, seed in (("a", 0), ("b", 1))}


def table_cells(table: str) -> dict[tuple[str, str], str]:
    """``{(row, column): cell}`` of a markdown table written by :func:`markdown_table`."""
    lines = [line.strip().strip("|").split("|") for line in table.strip().splitlines()]
    header = [c.strip() for c in lines[0]]
    return {(row[0].strip(), header[c]): row[c].strip() for row in lines[2:] for c in range(1, len(header))}


def check_consistent(out_dir: Path) -> dict[str, Any]:
    """results.md's and the plot's numbers are the JSON's; every record has k graded samples."""
    results = json.loads((out_dir / "results.json").read_text())
    models = results["models"]
    cells = table_cells((out_dir / "results.md").read_text())
    heights = plot_scores(models, out_dir / "replot.png")
    assert heights is not None and (out_dir / "scores.png").stat().st_size > 1000
    for label, model in models.items():
        for name, bench in model["benchmarks"].items():
            accuracy = [r["accuracy"] for r in bench["records"]]
            assert len(accuracy) == bench["n"] and all(
                len(r["samples"]) == bench["k"] for r in bench["records"]
            )
            assert bench["score"] == pytest.approx(sum(accuracy) / len(accuracy))
            assert bench["stderr"] == pytest.approx(standard_error(accuracy))
            cell = cells[(name, label)]
            assert cell == format_cell(bench["score"], bench["stderr"])
            shown = [float(x) for x in re.findall(r"[\d.]+", cell)]
            assert shown == [round(100 * bench["score"], 1), round(100 * bench["stderr"], 1)]
            assert heights[(label, name)] == pytest.approx(100 * bench["score"])
            assert cells[(name, "metric")].split("/").count(bench["metric"]) == 1
        average = model["average"]["score"]
        assert cells[("average", label)] == f"{100 * average:.1f}"
        assert average == pytest.approx(
            sum(b["score"] for b in model["benchmarks"].values()) / len(model["benchmarks"])
        )
    return results


def test_eval_tiny_end_to_end_and_comparison(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The shipped config on a tiny random Llama (3 benchmarks x 3 problems, greedy), then a second
    run that samples avg@2 with another model and puts the first run's results beside it."""
    first = tmp_path / "first"
    cfg = load_config(
        EvalConfig, CONF, [f"models=[{{path: {checkpoints['a']}, label: a}}]", f"out_dir={first}"]
    )
    cfg.progress = False
    results = run_eval(cfg)
    assert set(results["models"]) == {"a"}
    a = results["models"]["a"]
    assert list(a["benchmarks"]) == ["gsm8k", "math500", "aime"] and a["grader"] == "math_verify"
    for bench in a["benchmarks"].values():
        assert (bench["metric"], bench["n"], bench["k"]) == ("pass@1", 3, 1)
        for record in bench["records"]:
            sample = record["samples"][0]
            assert all(w.startswith("w") for w in sample["completion"].split())
            assert record["prompt"].startswith("<s> user ") and record["prompt"].endswith("<s> assistant ")
            assert sample["finish_reason"] in ("stop", "length") and 0 <= sample["num_tokens"] <= 32
            assert sample["correct"] is False  # a random model
    assert check_consistent(first)["models"] == results["models"]
    assert load_config(EvalConfig, first / "config.yaml") == cfg  # the resolved config, reloadable

    second = tmp_path / "second"
    overrides = [
        f"models=[{{path: {checkpoints['b']}, label: b}}]",
        f"compare_with=[{first / 'results.json'}]",
        "sampling.temperature=1.0",
        "sampling.top_p=0.9",
        "sampling.num_samples=2",
        "sampling.max_new_tokens=8",
        f"out_dir={second}",
        "save_completions=false",
    ]
    cfg = load_config(EvalConfig, CONF, overrides)
    cfg.progress = False
    results = run_eval(cfg)
    assert list(results["models"]) == ["b", "a"]
    assert results["models"]["a"] == json.loads((first / "results.json").read_text())["models"]["a"]
    b = results["models"]["b"]
    assert {(x["metric"], x["k"]) for x in b["benchmarks"].values()} == {("avg@2", 2)}
    assert all("completion" not in s for r in b["benchmarks"]["aime"]["records"] for s in r["samples"])
    check_consistent(second)
    assert "| gsm8k | avg@2/pass@1 | 3 |" in (second / "results.md").read_text()

    # Comparison only: no models, the two runs' results side by side (b's clash with this run? none).
    third = tmp_path / "third"
    cfg = load_config(EvalConfig, None, [f"compare_with=[{second / 'results.json'}]", f"out_dir={third}"])
    assert list(run_eval(cfg)["models"]) == ["b", "a"]
    check_consistent(third)


def test_scores_from_known_verdicts() -> None:
    """grade_completions on hand-written completions: right, wrong, #### and missing answers."""
    problems = [
        Problem("t", str(i), f"q{i}", ref, f"f:{i}") for i, ref in enumerate(["\\frac{1}{2}", "7", "3"])
    ]
    completions = [
        [Completion("so \\boxed{0.5}", 5, "stop"), Completion("\\boxed{\\dfrac{1}{2}}", 4, "stop")],
        [Completion("#### 7", 2, "stop"), Completion("the answer is 8", 4, "stop")],
        [Completion("w1 w2", 16, "length"), Completion("\\boxed{4", 16, "length")],
    ]
    cfg = EvalConfig(sampling=SamplingSection(temperature=0.7, num_samples=2))
    with Grader("math_verify") as grader:
        summary = grade_completions(problems, completions, ["p0", "p1", "p2"], grader, cfg)
    assert [r["accuracy"] for r in summary["records"]] == [1.0, 0.5, 0.0]
    assert summary["metric"] == "avg@2" and summary["score"] == pytest.approx(0.5)
    assert summary["stderr"] == pytest.approx(math.sqrt(0.25 / 3))  # sample std of (1, .5, 0) is .5
    assert summary["pass_at_k"] == pytest.approx(2 / 3)
    assert summary["no_answer_rate"] == pytest.approx(1 / 6)  # "w1 w2" (the cut-off box falls back to 4)
    assert summary["truncated_rate"] == pytest.approx(2 / 6) and summary["mean_tokens"] == pytest.approx(
        47 / 6
    )
    samples = [s for r in summary["records"] for s in r["samples"]]
    assert [s["extracted_by"] for s in samples] == [
        "boxed",
        "boxed",
        "gsm8k",
        "answer_is",
        None,
        "last_number",
    ]
    assert [s["graded_by"] for s in samples] == [
        "math_verify",
        "string",
        "string",
        "math_verify",
        "no_answer",
        "math_verify",
    ]
    assert score_benchmark([[True]], greedy=True) == {
        "metric": "pass@1",
        "score": 1.0,
        "stderr": None,
        "n": 1,
        "k": 1,
        "pass_at_k": 1.0,
    }
    table = markdown_table(
        {"m": {"benchmarks": {"t": {**summary, "records": []}}, "average": {"score": 0.5}}}
    )
    assert "| t | avg@2 | 3 | 50.0 ± 28.9 |" in table and "| average | | | 50.0 |" in table


def test_left_padded_batches_generate_what_single_prompts_do(checkpoints: dict[str, Path]) -> None:
    from nemo_dcod.eval.generation import TransformersGenerator, load_tokenizer, stop_token_ids

    path = str(checkpoints["a"])
    tokenizer = load_tokenizer(path)
    prompts = [[1, 10, 11], [1, 12, 13, 14, 15, 16, 17], [1, 20]]
    params = SamplingParams(max_new_tokens=10)
    stops = stop_token_ids(path, tokenizer)
    assert stops == [2]
    batched = TransformersGenerator(path, tokenizer, stops, batch_size=3, progress=False).generate(
        prompts, params
    )
    single = TransformersGenerator(path, tokenizer, stops, batch_size=1, progress=False).generate(
        prompts, params
    )
    assert batched == single and [len(row) for row in batched] == [1, 1, 1]
    sampled = TransformersGenerator(path, tokenizer, stops, batch_size=4, progress=False).generate(
        prompts, SamplingParams(temperature=1.0, num_samples=2, max_new_tokens=6, seed=3)
    )
    assert [len(row) for row in sampled] == [2, 2, 2]
    again = TransformersGenerator(path, tokenizer, stops, batch_size=4, progress=False).generate(
        prompts, SamplingParams(temperature=1.0, num_samples=2, max_new_tokens=6, seed=3)
    )
    assert sampled == again  # seeded


def test_config_problems_are_reported_together() -> None:
    bad = [
        "models=[{path: x/hf}, {path: y/hf}, {path: ''}]",
        "benchmarks=[{name: b, format: gsm8k, path: f}, {name: b, format: mmlu, path: f, limit: 0}]",
        "sampling.num_samples=4",
        "sampling.top_p=0",
        "grading.timeout=0",
        "grading.grader=sympy",
        "prompt_template=no placeholder",
        "batch_size=0",
    ]
    with pytest.raises(ConfigError) as err:
        load_config(EvalConfig, CONF, bad)
    text = str(err.value)
    for needle in (
        "models[1]: label 'hf' is also models[0]'s; set models[1].label",
        "models[2].path: set the Hugging Face checkpoint directory",
        "benchmarks[1].name='b': also benchmarks[0]'s",
        "benchmarks[1].format='mmlu': must be one of gsm8k, math, math500, amc, aime, olympiadbench",
        "benchmarks[1].limit=0: must be >= 1",
        "sampling.num_samples=4 with sampling.temperature=0: greedy samples are all the same",
        "sampling.top_p=0.0: must be in (0, 1]",
        "grading.timeout=0: must be >= 1 second",
        "grading.grader='sympy': must be one of auto, math_verify, string",
        "prompt_template: must contain {problem}",
        "batch_size=0: must be >= 1",
    ):
        assert needle in text, (needle, text)
    assert len(err.value.problems) == 11, text
    with pytest.raises(ConfigError, match="models: list at least one checkpoint"):
        load_config(EvalConfig, None, [])


def test_input_errors_come_before_any_model_loads(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(EvalError, match=r"models\[0\]\.path=.*absent: no config\.json there"):
        run_eval(
            load_config(EvalConfig, CONF, [f"models=[{{path: {tmp_path / 'absent'}}}]", f"out_dir={out}"])
        )
    missing_bench = [
        f"models=[{{path: {checkpoints['a']}}}]",
        f"benchmarks=[{{name: x, format: aime, path: {tmp_path / 'none.jsonl'}}}]",
        f"out_dir={out}",
    ]
    with pytest.raises(EvalError, match=r"none\.jsonl: no such file"):
        run_eval(load_config(EvalConfig, CONF, missing_bench))
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"format": "nemo-dcod-eval/1", "models": {"a": {}}}))
    clash = [f"models=[{{path: {checkpoints['a']}}}]", f"compare_with=[{earlier}]", f"out_dir={out}"]
    with pytest.raises(EvalError, match=r"model label 'a' is in both this run and .*earlier\.json"):
        run_eval(load_config(EvalConfig, CONF, clash))
    earlier.write_text("{}")
    with pytest.raises(EvalError, match=r"not a results\.json of nemo-dcod eval"):
        run_eval(load_config(EvalConfig, CONF, [f"compare_with=[{earlier}]", f"out_dir={out}"]))
    assert not out.exists()
