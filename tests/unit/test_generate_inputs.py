"""``nemo-dcod generate`` on bad input, its dry run, grading, workers from the launcher's variables.

Every bad input must stop the run with a message naming the file, record or field, *before* any
generation: the run's ``out_dir`` is not even created. A run that generates nothing usable (every
sample cut at ``max_new_tokens``) must exit non-zero and write no prepare config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.paths import ROOT

from nemo_dcod.cli import main
from nemo_dcod.config import ConfigError, load_config
from nemo_dcod.generate.config import GenerateConfig, GenerateError
from nemo_dcod.generate.problems import reference_answer
from nemo_dcod.generate.run import run_generate
from nemo_dcod.parallel.launch import worker_slot

GOOD = [{"question": f"w{i} w{i + 1}", "answer": f"#### {i}", "uid": i} for i in range(3)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.hf_tiny import make_hf_checkpoint

    return make_hf_checkpoint(tmp_path_factory.mktemp("teacher") / "hf", "llama", seed=2)


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return path


def _cfg(tmp_path: Path, teacher: Path, inputs: Path, *extra: str) -> GenerateConfig:
    return load_config(
        GenerateConfig,
        None,
        [
            f"inputs=[{inputs}]",
            f"teacher={teacher}",
            "fields.problem=question",
            "fields.reference=answer",
            "prompt_template='{problem}'",
            "sampling.max_new_tokens=4",
            "grading.grader=string",
            "progress=false",
            f"out_dir={tmp_path / 'out'}",
            *extra,
        ],
    )


def _refused(cfg: GenerateConfig) -> str:
    with pytest.raises(GenerateError) as err:
        run_generate(cfg)
    assert not Path(cfg.out_dir).exists()  # refused before anything was generated or written
    return str(err.value)


def test_malformed_and_unreadable_problem_files_name_the_record(tmp_path: Path, teacher: Path) -> None:
    bad_json = _jsonl(tmp_path / "a.jsonl", [GOOD[0], b'{"question": "w1", "answer": ', GOOD[1]])
    assert f"{bad_json}:2: malformed JSON" in _refused(_cfg(tmp_path, teacher, bad_json))
    latin1 = _jsonl(tmp_path / "b.jsonl", [GOOD[0], GOOD[1], b'{"question": "caf\xe9", "answer": "1"}'])
    assert f"{latin1}:3: not UTF-8" in _refused(_cfg(tmp_path, teacher, latin1))
    not_object = _jsonl(tmp_path / "c.jsonl", [[1, 2]])
    assert f"{not_object}:1: expected an object" in _refused(_cfg(tmp_path, teacher, not_object))
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"this is not parquet")
    assert f"{parquet}: not a readable Parquet file" in _refused(_cfg(tmp_path, teacher, parquet))
    empty = _jsonl(tmp_path / "e.jsonl", [])
    assert "no problems found" in _refused(_cfg(tmp_path, teacher, empty))
    assert "no such file" in _refused(_cfg(tmp_path, teacher, tmp_path / "missing.jsonl"))


def test_missing_fields_and_duplicate_ids_are_listed_together(tmp_path: Path, teacher: Path) -> None:
    rows = [GOOD[0], {"prompt": "w1", "answer": "#### 1"}, {"question": "w2", "answer": None}, GOOD[0]]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    message = _refused(_cfg(tmp_path, teacher, path, "fields.id=uid"))
    assert f"{path}:2: no field 'question' (fields.problem); it has answer, prompt" in message
    assert f"{path}:3: field 'answer' (fields.reference) is null" in message
    assert message.startswith("3 bad problem record(s)")  # one problem per record, all records
    assert f"{path}:4: id '0' (fields.id) is also the id at {path}:1" in message
    # without an id field the problems are numbered: no clash
    numbered = _jsonl(tmp_path / "q.jsonl", [GOOD[0], GOOD[0], {"question": 3, "answer": "1"}])
    assert f"{numbered}:3: field 'question' (fields.problem) is a int, not text" in _refused(
        _cfg(tmp_path, teacher, numbered)
    )


def test_a_tokenizer_without_chat_template_is_refused(tmp_path: Path, teacher: Path) -> None:
    from transformers import AutoTokenizer

    bare = tmp_path / "bare_tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(bare)
    problems = _jsonl(tmp_path / "p.jsonl", GOOD)
    message = _refused(_cfg(tmp_path, teacher, problems, f"tokenizer={bare}"))
    assert (
        f"tokenizer {bare}" in message
        and "no chat template" in message
        and "use_chat_template=false" in message
    )
    # the same tokenizer serves a base-model prompt
    cfg = _cfg(tmp_path, teacher, problems, f"tokenizer={bare}", "use_chat_template=false", "limit=1")
    assert main(["generate", "--dry-run", *_as_overrides(cfg)]) == 0


def test_lengths_beyond_the_context_and_config_problems(tmp_path: Path, teacher: Path, capsys: Any) -> None:
    long = _jsonl(tmp_path / "p.jsonl", [GOOD[0], {"question": " ".join(["w3"] * 40), "answer": "1"}])
    message = _refused(_cfg(tmp_path, teacher, long, "sampling.max_new_tokens=30"))
    assert f"the longest, {long}:2, has" in message and "max_position_embeddings" in message
    assert "Lower sampling.max_new_tokens to at most" in message
    assert "max_model_len=100 > the teacher's context of 64" in _refused(
        _cfg(tmp_path, teacher, long, "max_model_len=100")
    )
    with pytest.raises(ConfigError) as err:
        _cfg(
            tmp_path,
            teacher,
            long,
            "sampling.samples_per_problem=0",
            "sampling.temperature=-1",
            "worker_index=2",
        )
    text = str(err.value)
    assert "sampling.samples_per_problem=0: must be >= 1" in text and "sampling.temperature=-1" in text
    assert "worker_index and num_workers: set both" in text
    assert main(["generate", f"inputs=[{long}]", f"teacher={teacher}", "sampling.samples_per_problem=0"]) == 2
    assert "sampling.samples_per_problem=0" in capsys.readouterr().err
    empty_teacher = tmp_path / "no_model"
    empty_teacher.mkdir()
    assert "no config.json there" in _refused(_cfg(tmp_path, empty_teacher, long))


def test_nothing_usable_is_a_failure_not_a_success(tmp_path: Path, teacher: Path, capsys: Any) -> None:
    problems = _jsonl(tmp_path / "p.jsonl", GOOD)
    args = _as_overrides(_cfg(tmp_path, teacher, problems, "sampling.max_new_tokens=1", "sampling.seed=4"))
    assert main(["generate", *args]) == 1
    err = capsys.readouterr().err
    assert "none of 3 samples is usable (length 3" in err and "Raise sampling.max_new_tokens" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["ok"] is False and report["usable"] == 0
    assert not (tmp_path / "out" / "prepare.yaml").exists()
    assert main(["generate", *args]) == 1  # a rerun reads the finished shards and says the same
    # keep=correct with no correct sample (a random teacher never writes `#### n`) writes nothing
    out2 = tmp_path / "out2"
    args = _as_overrides(_cfg(tmp_path, teacher, problems, "keep=correct", f"out_dir={out2}"))
    assert main(["generate", *args, "sampling.max_new_tokens=40", "sampling.stop=[w1]"]) == 1
    assert "keep=correct, and none of 3 samples was graded correct" in capsys.readouterr().err


def test_a_rerun_with_other_settings_is_refused_unless_overwrite(tmp_path: Path, teacher: Path) -> None:
    problems = _jsonl(tmp_path / "p.jsonl", GOOD)
    base = ("sampling.max_new_tokens=30", "sampling.stop=[w1]")
    run_generate(_cfg(tmp_path, teacher, problems, *base))
    with pytest.raises(GenerateError, match="shard 0 was generated from other problems"):
        run_generate(_cfg(tmp_path, teacher, problems, *base, "sampling.seed=9"))
    run_generate(_cfg(tmp_path, teacher, problems, *base, "sampling.seed=9", "overwrite=true"))
    meta = json.loads((tmp_path / "out" / "meta" / "shard-00000.json").read_text())
    assert meta["sampling"]["seed"] == 9 and meta["sampling"]["stop"] == ["w1"]


def _as_overrides(cfg: GenerateConfig) -> list[str]:
    from omegaconf import OmegaConf

    flat = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(flat, dict)
    out = []
    for key, value in flat.items():
        if isinstance(value, dict):
            out.extend(f"{key}.{k}={json.dumps(v)}" for k, v in value.items() if v is not None)
        elif value is not None:
            out.append(f"{key}={json.dumps(value)}")
    return out


def test_dry_run_of_the_tiny_conf_plans_without_loading_a_model(
    teacher: Path, capsys: Any, tmp_path: Path
) -> None:
    args = [
        "generate",
        "--config",
        "conf/generate_tiny.yaml",
        f"teacher={teacher}",
        f"out_dir={tmp_path / 'o'}",
        "sampling.max_new_tokens=32",  # this teacher's context is 64 tokens
    ]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 problems -> 2 shard(s) of up to 4; 4 sample(s) each" in out and "= 32 samples" in out
    assert "end-of-turn token kept: '</s>'" in out and "dry run ok" in out
    assert not (tmp_path / "o").exists()
    assert main([*args, "--dry-run", "sampling.max_new_tokens=60"]) == 1
    assert (
        "8 prompt(s) + sampling.max_new_tokens=60 exceed the context of 64 tokens" in capsys.readouterr().err
    )


def test_the_70b_recipe_and_its_prepare_config_agree_with_what_generate_writes(tmp_path: Path) -> None:
    from nemo_dcod.data.config import PrepareConfig
    from nemo_dcod.generate.report import prepare_config_text

    recipe = load_config(GenerateConfig, ROOT / "conf" / "generate_llama70b.yaml", check=False)
    assert recipe.problems(has_gpu=True) == []
    assert recipe.problems(has_gpu=False) != []  # vLLM needs the GPU node
    shipped = load_config(PrepareConfig, ROOT / "conf" / "generate_llama70b_prepare.yaml")
    written_path = tmp_path / "prepare.yaml"
    written_path.write_text(
        prepare_config_text(Path(recipe.out_dir), recipe.teacher, True, False, None, "f" * 64)
    )
    written = load_config(PrepareConfig, written_path)
    assert shipped.fields == written.fields and shipped.inputs == written.inputs
    assert shipped.tokenizer == written.tokenizer == recipe.teacher
    # Both use the sampled ids as they are (the teacher's vocabulary named one way or the other)
    # and leave out traces cut at max_new_tokens.
    assert shipped.teacher_tokenizer == recipe.teacher and written.teacher_tokenizer_fingerprint == "f" * 64
    assert shipped.cut_off == written.cut_off == "drop" and written.fields.finish_reason == "finish_reason"


def test_references_are_reduced_to_their_final_answer() -> None:
    assert reference_answer("Mia has 3 * 4 = 12.\n#### 12") == "12"
    assert reference_answer("so the area is $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert reference_answer(142.0) == "142" and reference_answer("  $5$ ") == "5"
    assert reference_answer(["1", 2]) == "1, 2"


def test_a_trace_is_graded_with_evals_extraction(tmp_path: Path) -> None:
    from helpers.hf_tiny import make_hf_checkpoint
    from helpers.trace_fixtures import ids, make_tokenizer

    from nemo_dcod.eval.generation import Completion
    from nemo_dcod.eval.grading import Grader
    from nemo_dcod.generate.plan import build_plan
    from nemo_dcod.generate.run import _trace

    teacher = make_hf_checkpoint(tmp_path / "t", "llama", seed=1)
    make_tokenizer(teacher)  # words incl. "the answer is" and "####"
    problems = _jsonl(
        tmp_path / "p.jsonl", [{"question": "w1 w2", "answer": "#### 12"}, {"question": "w3", "answer": "13"}]
    )
    cfg = _cfg(tmp_path, teacher, problems)
    plan = build_plan(cfg)
    tokens = ids("w5 the answer is #### 12")
    completion = Completion("", len(tokens), "stop", tuple(tokens), tuple([-0.5] * len(tokens)), 2, -0.25)
    with Grader("string") as grader:
        right = _trace(cfg, plan, grader, 0, 0, completion)
        wrong = _trace(cfg, plan, grader, 1, 3, completion)
    assert (right["answer"], right["correct"], right["reference"]) == ("12", True, "12")
    assert (wrong["correct"], wrong["sample"], wrong["id"]) == (False, 3, "1")
    assert right["teacher_tokens"] == [*tokens, 2] and right["teacher_logprobs"][-1] == -0.25  # </s> kept
    assert right["response"] == "w5 the answer is #### 12" and right["prompt"] == "w1 w2"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 1, 0)),
        ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (3, 4, 1)),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, (1, 2, 0)),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (0, 1, 0)),  # a batch shell: not a step
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4, 0)),
        (
            {
                "SLURM_ARRAY_TASK_ID": "4",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_STEP": "2",
                "SLURM_ARRAY_TASK_MAX": "6",
                "SLURM_PROCID": "1",
                "SLURM_NTASKS": "2",
            },
            (5, 8, 0),
        ),
    ],
)
def test_worker_slots_from_the_launcher(env: dict[str, str], expected: tuple[int, int, int]) -> None:
    slot = worker_slot(env)
    assert (slot.index, slot.count, slot.local_rank) == expected


def test_an_irregular_array_is_refused() -> None:
    with pytest.raises(ValueError, match="not on a regular range"):
        worker_slot({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"})
