"""Benchmark loaders on small files in each benchmark's public format, errors that point at the
record, prompt templates and chat-template encoding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.paths import ROOT

from nemo_dcod.eval.benchmarks import BenchmarkError, Problem, load_problems, render_prompt
from nemo_dcod.eval.config import EvalError
from nemo_dcod.eval.generation import encode_prompts


def jsonl(path: Path, records: list[Any]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def parquet(path: Path, records: list[dict[str, Any]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path)
    return str(path)


def test_gsm8k(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "test.jsonl",
        [
            {"question": "Q1?", "answer": "3 * 4 = <<3*4=12>>12\n#### 12"},
            {"question": "Q2?", "answer": "1000 + 234 = 1,234\n#### 1,234"},
        ],
    )
    problems = load_problems("gsm8k", path, "gsm")
    assert [(p.id, p.question, p.reference) for p in problems] == [("0", "Q1?", "12"), ("1", "Q2?", "1234")]
    assert problems[1].location == f"{path}:2" and problems[0].benchmark == "gsm"


def test_math_reference_is_the_last_box_of_the_solution(tmp_path: Path) -> None:
    record = {
        "problem": "Compute $\\frac{1}{2}+\\frac{1}{3}$.",
        "solution": "First \\boxed{6} is the denominator; the sum is $\\boxed{\\frac{5}{6}}$.",
        "level": "Level 2",
        "type": "Prealgebra",
    }
    path = jsonl(tmp_path / "math.jsonl", [record])
    (problem,) = load_problems("math", path)
    assert problem.reference == "\\frac{5}{6}"
    assert problem.meta == {"level": "Level 2", "type": "Prealgebra"}


def test_math500_from_parquet_keeps_unique_ids_and_metadata(tmp_path: Path) -> None:
    records = [
        {
            "problem": f"P{i}",
            "solution": "...",
            "answer": answer,
            "subject": "Algebra",
            "level": 3,
            "unique_id": f"test/algebra/{i}.json",
        }
        for i, answer in enumerate(["\\left( 3, \\frac{\\pi}{2} \\right)", "$5$", "(-2,2)"])
    ]
    path = parquet(tmp_path / "test-00000-of-00001.parquet", records)
    problems = load_problems("math500", path)
    assert [p.id for p in problems] == ["test/algebra/0.json", "test/algebra/1.json", "test/algebra/2.json"]
    assert [p.reference for p in problems] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "5", "(-2,2)"]
    assert problems[2].location == f"{path}[row 2]" and problems[0].meta == {"subject": "Algebra", "level": 3}
    assert [p.id for p in load_problems("math500", path, limit=2)] == [
        "test/algebra/0.json",
        "test/algebra/1.json",
    ]


def test_amc_float_answers_and_ids(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "amc.jsonl",
        [
            {"id": 0, "problem": "A?", "answer": 142.0, "url": "https://example.org/a"},
            {"id": 1, "problem": "B?", "answer": 0.5, "url": "https://example.org/b"},
        ],
    )
    problems = load_problems("amc", path)
    assert [(p.id, p.reference) for p in problems] == [("0", "142"), ("1", "0.5")]
    assert problems[0].meta == {"url": "https://example.org/a"}


def test_aime_24_and_25_releases(tmp_path: Path) -> None:
    # AIME 2024 as one release has it (capitalised fields, in Parquet) ...
    aime24 = parquet(
        tmp_path / "aime24.parquet",
        [{"ID": "2024-I-1", "Problem": "First?", "Solution": "...", "Answer": 204}],
    )
    # ... and AIME 2025 as another has it (question/answer, JSONL), and the id/problem/answer form.
    aime25 = jsonl(tmp_path / "aime25.jsonl", [{"question": "Second?", "answer": "70"}])
    aime25b = jsonl(
        tmp_path / "aime25b.jsonl", [{"id": 7, "problem": "Third?", "answer": "033", "year": 2025}]
    )
    (p24,) = load_problems("aime", aime24, "aime24")
    assert (p24.id, p24.question, p24.reference, p24.benchmark) == ("2024-I-1", "First?", "204", "aime24")
    (p25,) = load_problems("aime", aime25, "aime25")
    assert (p25.id, p25.question, p25.reference) == ("0", "Second?", "70")
    (p25b,) = load_problems("aime", aime25b)
    assert (p25b.id, p25b.reference, p25b.meta) == ("7", "033", {"year": 2025})


def test_olympiadbench_answer_lists_and_context(tmp_path: Path) -> None:
    records = [
        {"id": 2231, "question": "Find x.", "final_answer": ["$\\frac{1}{2}$"], "context": None},
        {
            "id": 2232,
            "question": "Find all n.",
            "final_answer": ["$1$", "$2$"],
            "is_multiple_answer": True,
            "context": "Let n be a positive integer.",
            "unit": None,
            "answer_type": "Numerical",
        },
    ]
    path = tmp_path / "OE_TO_maths_en_COMP.json"
    path.write_text(json.dumps(records))
    problems = load_problems("olympiadbench", str(path))
    assert [p.reference for p in problems] == ["\\frac{1}{2}", "1, 2"]
    assert problems[1].question == "Let n be a positive integer.\n\nFind all n."
    assert problems[1].meta == {"answer_type": "Numerical"} and problems[0].question == "Find x."


def test_glob_and_saved_dataset(tmp_path: Path) -> None:
    import datasets

    for i in range(2):
        jsonl(tmp_path / f"part{i}.jsonl", [{"id": f"{i}", "problem": f"P{i}", "answer": str(i)}])
    assert [p.id for p in load_problems("aime", str(tmp_path / "part*.jsonl"))] == ["0", "1"]
    records = [{"problem": "P", "answer": "4", "unique_id": "u"}]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "saved"))
    (problem,) = load_problems("math500", str(tmp_path / "saved"), split="test")
    assert (problem.id, problem.reference, problem.location) == ("u", "4", f"{tmp_path / 'saved'}[row 0]")
    with pytest.raises(BenchmarkError, match=r"splits \['test'\]; set split"):
        load_problems("math500", str(tmp_path / "saved"), split="train")


def test_errors_name_the_record(tmp_path: Path) -> None:
    bad_json = jsonl(tmp_path / "bad.jsonl", [{"question": "Q", "answer": "#### 1"}, "{not json"])
    with pytest.raises(BenchmarkError, match=f"{bad_json}:2: malformed JSON"):
        load_problems("gsm8k", bad_json)
    missing = jsonl(tmp_path / "missing.jsonl", [{"problem": "Q", "solution": "no box"}, {"prob": "Q"}])
    with pytest.raises(BenchmarkError, match=f"{missing}:1: no \\\\boxed{{}} answer in field 'solution'"):
        load_problems("math", missing)
    with pytest.raises(BenchmarkError) as err:
        load_problems("aime", missing)
    assert f"{missing}:1: a aime record needs 'answer' or 'Answer'" in str(err.value)
    assert "it has ['problem', 'solution']" in str(err.value)
    no_marker = jsonl(tmp_path / "gsm.jsonl", [{"question": "Q", "answer": "12"}])
    with pytest.raises(BenchmarkError, match="no '####' answer line"):
        load_problems("gsm8k", no_marker)
    dup = jsonl(tmp_path / "dup.jsonl", [{"id": 1, "problem": "A", "answer": "1"}] * 2)
    with pytest.raises(BenchmarkError, match=f"{dup}:2: id '1' also at {dup}:1"):
        load_problems("aime", dup)
    with pytest.raises(BenchmarkError, match="no such file or directory"):
        load_problems("aime", str(tmp_path / "absent.jsonl"))
    with pytest.raises(BenchmarkError, match="matches no file"):
        load_problems("aime", str(tmp_path / "absent*.jsonl"))
    (tmp_path / "x.csv").write_text("problem,answer\n")
    with pytest.raises(BenchmarkError, match=r"unknown suffix '\.csv'"):
        load_problems("aime", str(tmp_path / "x.csv"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(BenchmarkError, match="no problems found"):
        load_problems("aime", str(tmp_path / "empty.jsonl"))
    assert issubclass(BenchmarkError, EvalError)


def test_the_example_files_load() -> None:
    for fmt, name in (("gsm8k", "gsm8k"), ("math500", "math500"), ("aime", "aime")):
        problems = load_problems(fmt, str(ROOT / "examples/eval" / f"{name}.jsonl"))
        assert len(problems) == 3 and all(p.reference for p in problems)


def test_prompt_template_and_chat_encoding(tmp_path: Path) -> None:
    from helpers.trace_fixtures import ids as vocab_ids
    from helpers.trace_fixtures import make_tokenizer

    from nemo_dcod.eval.generation import load_tokenizer

    problem = Problem("b", "0", "w1 w2", "5", "x:1")
    template = "{problem} w3 \\boxed{}"  # braces other than {problem} are not special
    assert render_prompt(template, problem) == "w1 w2 w3 \\boxed{}"
    tokenizer = load_tokenizer(make_tokenizer(tmp_path / "tok"))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"
    texts, ids = encode_prompts(tokenizer, ["w1 w2"], use_chat_template=True, system_prompt="w9")
    assert texts == ["<s> system w9 </s> <s> user w1 w2 </s> <s> assistant "]
    assert ids == [vocab_ids("<s> system w9 </s> <s> user w1 w2 </s> <s> assistant")]  # no second <s>
    texts, ids = encode_prompts(tokenizer, ["w1 w2"], use_chat_template=False)
    assert texts == ["w1 w2"] and ids == [vocab_ids("w1 w2")]
    custom = load_tokenizer(str(tmp_path / "tok"), chat_template="{{ messages[-1]['content'] }} w5")
    assert encode_prompts(custom, ["w1"])[0] == ["w1 w5"]
    template_file = tmp_path / "template.jinja"
    template_file.write_text("{{ messages[-1]['content'] }} w6")
    assert encode_prompts(load_tokenizer(str(tmp_path / "tok"), str(template_file)), ["w1"])[0] == ["w1 w6"]
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template: set chat_template"):
        encode_prompts(tokenizer, ["w1"], use_chat_template=True)
