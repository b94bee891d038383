"""Pre-flight tells the truth: every shipped recipe passes its dry run against a real store, the
dry runs refuse what the runs refuse at start, and a chain is checked before its store exists.

Stores here are made by the real ``prepare`` from trace files (the recipe's row length, a
tokenizer of the recipe's vocabulary size, the engine's log-probs as the teacher column). The
dry runs read them as the runs do; where the store is not there yet, the store plan written by the
dry runs of the stages before stands in for it (the Slurm driver's order: prepare, score, train).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from helpers.paths import ROOT
from helpers.trace_fixtures import prepare_store

from nemo_dcod.cli import main
from nemo_dcod.config import load_config
from nemo_dcod.score.config import ScoreConfig
from nemo_dcod.train.config import TrainConfig


def _store_recipes(stage: str) -> list[Path]:
    out = []
    for path in sorted((ROOT / "conf").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        if first.split()[2] == stage and (stage == "score" or "source: store" in path.read_text()):
            out.append(path)
    return out


@pytest.mark.parametrize("recipe", _store_recipes("train"), ids=lambda p: p.name)
def test_every_train_recipe_on_a_store_passes_its_dry_run_against_a_real_one(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(TrainConfig, recipe, check=False)
    store = prepare_store(tmp_path, cfg.data.seq_length, cfg.data.vocab_size)
    args = ["train", "--config", str(recipe), "--dry-run", f"data.path={store}"]
    if cfg.model.init_from:
        args.append("model.init_from=null")  # a checkpoint of this size is not made here
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if cfg.model.spec == "te":  # the 8B recipe: TE on packed rows, no dense masks in the estimate
        assert "Transformer Engine layers, packed rows as THD" in out, out


@pytest.mark.parametrize("recipe", _store_recipes("score"), ids=lambda p: p.name)
def test_every_score_recipe_passes_its_dry_run_against_a_realprepare_store(
    recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = prepare_store(tmp_path, 128, 209)
    plan = tmp_path / "plan.json"
    # No checkpoint of the recipe's teacher exists here: its checks are the job's (said so).
    args = ["score", "--config", str(recipe), "--dry-run", f"store={store}", "--made-later"]
    assert main([*args, "overwrite=true", "--store-plan", str(plan)]) == 0, capsys.readouterr().err
    assert "run in the job" in capsys.readouterr().out
    assert json.loads(plan.read_text())["topk"] == load_config(ScoreConfig, recipe, check=False).topk


def test_a_chain_is_checked_before_its_store_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """prepare -> score -> train dry runs through a store plan, as the Slurm driver runs them."""
    plan, store = tmp_path / "store.plan.json", tmp_path / "later" / "store"
    tiny = ["conf/prepare_tiny.yaml", f"out_dir={store}", "--dry-run", "--store-plan", str(plan)]
    assert main(["prepare", "--config", *tiny]) == 0, capsys.readouterr().err
    facts = json.loads(plan.read_text())
    assert (facts["seq_length"], facts["vocab_size"], facts["teacher_logprobs"]) == (128, 209, "generation")
    assert not store.exists()  # a dry run writes nothing but the plan
    train = ["train", "--config", "conf/train_store_tiny.yaml", "--dry-run", f"data.path={store}"]
    assert main([*train, "--store-plan", str(plan)]) == 0, capsys.readouterr().err
    # What the store will lack, or hold otherwise, is refused before anything is submitted.
    assert main([*train, "--store-plan", str(plan), "loss.base=kl"]) == 2
    assert "reads the teacher top-k" in capsys.readouterr().err
    assert main([*train, "--store-plan", str(plan), "data.seq_length=256"]) == 2
    assert "rows of 128 tokens" in capsys.readouterr().err
    assert main(train) == 2  # no store and no plan: say what to run
    assert "run `nemo-dcod prepare` first" in capsys.readouterr().err
    score = ["score", "--config", "conf/score_tiny.yaml", "--dry-run", f"store={store}", "--made-later"]
    assert main([*score, "--store-plan", str(plan), "overwrite=false"]) == 2  # as the run would
    assert "set overwrite=true" in capsys.readouterr().err
    assert main([*score, "--store-plan", str(plan), "topk=4"]) == 0, capsys.readouterr().err
    assert json.loads(plan.read_text())["topk"] == 4
    assert main([*train, "--store-plan", str(plan), "loss.base=kl"]) == 0, capsys.readouterr().err


def test_dry_runs_refuse_what_the_runs_refuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = prepare_store(tmp_path / "a", 128, 209)
    base = ["train", "--config", "conf/train_store_tiny.yaml", f"data.path={store}"]
    cases: list[tuple[list[str], str]] = [
        # Megatron's local attention cannot split a sequence: refused before NeMo starts.
        (["parallel.context_parallel_size=2", "trainer.devices=4"], "needs Transformer Engine layers"),
        (["data.vocab_size=300"], "the tokenizer of the store"),
        (["loss.base=kl"], "reads the teacher top-k"),
    ]
    for extra, message in cases:
        for dry in ([], ["--dry-run"]):
            assert main([*base, *extra, *dry]) == 2, (extra, dry)
            assert message in capsys.readouterr().err, (extra, dry)
    # A TE recipe on packed rows takes one row per micro-batch (THD), on the GPU node it is for.
    te = [*base, "model.spec=te", "precision.dtype=bf16", "--dry-run", "trainer.micro_batch_size=2"]
    te += ["trainer.global_batch_size=4"]
    assert main(te) == 2
    assert "takes one row per micro-batch" in capsys.readouterr().err


def test_one_document_per_row_needs_no_mask_and_reports_its_padding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = prepare_store(tmp_path, 64, 209, packing="none")
    report = json.loads((Path(store).parent / "store" / "report.json").read_text())
    assert report["rows"] == report["documents"] == 40 and report["packing"] == "none"
    assert report["padding_tokens"] == 40 * 64 - report["tokens"] > 0
    # Every spec, micro-batch > 1 allowed: causal attention is all a single document needs.
    args = ["train", "--config", "conf/train_store_tiny.yaml", f"data.path={store}", "data.seq_length=64"]
    te = [*args, "--dry-run", "model.spec=te", "precision.dtype=bf16", "trainer.micro_batch_size=2"]
    assert main(te) == 0, capsys.readouterr().err
    assert "one document per row" in capsys.readouterr().out


def _estimate_gib(out: str) -> float:
    match = re.search(r"memory estimate per GPU \(training.*?\): ([\d.]+) GiB", out)
    assert match, out
    return float(match.group(1))


def test_the_estimate_models_the_attention_that_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg: Any = load_config(TrainConfig, ROOT / "conf" / "distill_llama8b.yaml", check=False)
    store = prepare_store(tmp_path, cfg.data.seq_length, cfg.data.vocab_size)
    args = ["train", "--config", "conf/distill_llama8b.yaml", "--dry-run", f"data.path={store}"]
    args += ["model.init_from=null", "precision.fp8=null"]
    assert main(args) == 0
    te = _estimate_gib(capsys.readouterr().out)
    # The local layers on the same packed rows: unfused [s, s] scores and a resident dense mask.
    main([*args, "model.spec=local"])
    out = capsys.readouterr().out
    assert "local layers, packed rows with a dense block-diagonal mask" in out
    assert _estimate_gib(out) > te + 8  # at 8k tokens the scores dominate
