"""Checkpoint conversion without a conversion: bad input, configs, flags, staging, the coverage check.

Everything here fails (or passes) before NeMo converts a single tensor, so it runs in seconds;
the conversions themselves are in ``tests/distributed/test_convert_roundtrip.py``.

    .venv/bin/pytest tests/unit/test_convert_inputs.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.hf_tiny import make_hf_checkpoint, make_tokenizer, shard_files

from nemo_dcod.cli import main
from nemo_dcod.config import ConfigError, load_config
from nemo_dcod.convert.config import ExportConfig, ImportConfig
from nemo_dcod.convert.coverage import (
    ConversionError,
    Coverage,
    ReadTracker,
    parameter_storage,
    tracked_state,
)
from nemo_dcod.convert.hf_import import InputError, check_hf_folder
from nemo_dcod.convert.staging import staged_directory


def _leftovers(folder: Path) -> list[str]:
    """Anything a failed run may have left: partial staging folders and lock files."""
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or p.suffix == ".lock")


# --------------------------------------------------------------------------- bad Hugging Face folders


def test_missing_shard_is_named(tmp_path: Path) -> None:
    src = make_hf_checkpoint(tmp_path / "hf", "llama", max_shard_size="200KB")
    shards = shard_files(src)
    assert len(shards) >= 2
    (src / shards[1]).unlink()
    with pytest.raises(InputError, match=rf"1 of the {len(shards)} shards .* missing: {shards[1]}"):
        check_hf_folder(src)


def test_unsupported_architecture_and_settings(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256)).save_pretrained(gpt2)
    make_tokenizer().save_pretrained(gpt2)
    with pytest.raises(
        InputError, match=r"GPT2LMHeadModel.*not supported.*LlamaForCausalLM, Qwen2ForCausalLM"
    ):
        check_hf_folder(gpt2)

    yarn = make_hf_checkpoint(
        tmp_path / "yarn", "qwen2", rope_scaling={"rope_type": "yarn", "factor": 4.0}, attention_bias=True
    )
    with pytest.raises(InputError, match=r"rope_scaling=.*yarn.*only Llama 3's"):
        check_hf_folder(yarn)

    llama = make_hf_checkpoint(tmp_path / "llama", "llama")
    with pytest.raises(InputError, match=r"family='qwen3', but .* holds a LlamaForCausalLM"):
        check_hf_folder(llama, family="qwen3")
    with pytest.raises(InputError, match=r"family='gpt5': must be one of"):
        check_hf_folder(llama, family="gpt5")
    assert check_hf_folder(llama, family="llama3.1")[1].name == "llama"


def test_tokenizer_larger_than_the_embedding(tmp_path: Path) -> None:
    src = make_hf_checkpoint(tmp_path / "hf", "qwen3", tokenizer_vocab=300)
    with pytest.raises(InputError, match=r"tokenizer has 300 tokens but the model's vocab_size is 256"):
        check_hf_folder(src)


def test_cli_bad_input_and_existing_target_leave_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_hf_checkpoint(tmp_path / "hf", "llama", max_shard_size="200KB")
    (src / shard_files(src)[0]).unlink()
    out = tmp_path / "nemo"
    assert main(["import", "--hf", str(src), "--out", str(out)]) == 1
    assert "shards listed in model.safetensors.index.json are missing" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []

    good = make_hf_checkpoint(tmp_path / "good", "qwen2")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["import", "--hf", str(good), "--out", str(out)]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and _leftovers(tmp_path) == []

    fake = tmp_path / "ckpt"
    (fake / "context").mkdir(parents=True)
    (fake / "weights").mkdir()
    hf_out = tmp_path / "hf_out"
    hf_out.mkdir()
    assert main(["export", "--checkpoint", str(fake), "--hf-out", str(hf_out)]) == 1
    assert f"{hf_out} exists; pass --overwrite" in capsys.readouterr().err
    assert list(hf_out.iterdir()) == [] and _leftovers(tmp_path) == []
    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--hf-out", str(tmp_path / "x")]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(src), "--hf-out", str(tmp_path / "x")]) == 1
    assert "not a NeMo 2 checkpoint (no context/ and weights/) nor a folder holding a complete one" in (
        capsys.readouterr().err
    )
    # A run's checkpoints/ folder is taken as score takes it: its newest complete checkpoint (this
    # one is incomplete: no context/io.json, no weights metadata).
    run_checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(fake, run_checkpoints / "step=1-consumed_samples=2.0")
    assert main(["export", "--checkpoint", str(run_checkpoints), "--hf-out", str(tmp_path / "y")]) == 1
    assert "nor a folder holding a complete one (e.g. <run_dir>/checkpoints)" in capsys.readouterr().err
    (fake / "weights").rmdir()
    assert main(["export", "--checkpoint", str(fake), "--hf-out", str(tmp_path / "z")]) == 1
    assert "not a NeMo 2 checkpoint (no weights/)" in capsys.readouterr().err


# --------------------------------------------------------------------------- configs and flags


def test_configs_report_every_problem() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ImportConfig, None, ["verify.tolerance=-1", "verify.dtype=fp8", "verify.seq_length=1"])
    text = str(err.value)
    assert len(err.value.problems) == 5, text
    for needle in (
        "hf: required",
        "out: required",
        "verify.tolerance=-1.0",
        "verify.dtype='fp8'",
        "seq_length=1",
    ):
        assert needle in text
    with pytest.raises(ConfigError, match="give at least one output"):
        load_config(ExportConfig, None, ["checkpoint=/x"])
    with pytest.raises(ConfigError, match="nemo_out=/x: must differ from checkpoint"):
        load_config(ExportConfig, None, ["checkpoint=/x", "nemo_out=/x"])


def test_flags_are_shorthands_for_keys(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[ImportConfig | ExportConfig] = []
    monkeypatch.setattr("nemo_dcod.convert.hf_import.run_import", seen.append)
    monkeypatch.setattr("nemo_dcod.convert.hf_export.run_export", seen.append)
    assert (
        main(["import", "--hf", "/a", "--out", "/b", "--no-verify", "--overwrite", "verify.seq_length=8"])
        == 0
    )
    assert (
        main(["export", "--checkpoint", "/c", "--hf-out", "/d", "--nemo-out", "/e", "--tokenizer", "/a"]) == 0
    )
    imp, exp = seen
    assert isinstance(imp, ImportConfig) and isinstance(exp, ExportConfig)
    assert (imp.hf, imp.out, imp.overwrite, imp.verify.enabled, imp.verify.seq_length) == (
        "/a",
        "/b",
        True,
        False,
        8,
    )
    assert (exp.checkpoint, exp.hf_out, exp.nemo_out, exp.tokenizer, exp.verify.enabled) == (
        "/c",
        "/d",
        "/e",
        "/a",
        True,
    )
    assert main(["train", "--hf", "/a"]) == 2
    assert "--hf: a flag of `nemo-dcod import`, not of `train`" in capsys.readouterr().err


# --------------------------------------------------------------------------- staging


def test_staged_directory_is_all_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), staged_directory(target) as staging:
        staging.mkdir()
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not target.exists() and _leftovers(tmp_path) == []

    with staged_directory(target) as staging:
        staging.mkdir()
        (staging / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(FileExistsError, match="pass --overwrite"), staged_directory(target):
        pass
    with staged_directory(target, overwrite=True) as staging:
        staging.mkdir()
        (staging / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and sorted(
        p.name for p in tmp_path.iterdir()
    ) == ["out"]


# --------------------------------------------------------------------------- the coverage check


def test_read_tracker_counts_tied_aliases_as_read() -> None:
    emb = torch.randn(8, 4)
    tracked = tracked_state(
        {"embed": emb, "lm_head": emb, "norm": torch.ones(4), "bias": torch.zeros(4)}, None
    )
    state = tracked.state_dict()
    assert isinstance(state, ReadTracker)
    _ = state["embed"], state.get("norm")
    assert state.read == {"embed", "norm"}
    target = torch.nn.Linear(4, 4)
    before = parameter_storage(target)
    target.weight = torch.nn.Parameter(torch.randn(4, 4))  # written; the bias is not
    cov = Coverage.measure("import", tracked, target, before)
    assert cov.source_aliases == ["lm_head"] and cov.source_unread == ["bias"]
    assert cov.target_unwritten == ["bias"]
    with pytest.raises(
        ConversionError, match=r"1 source tensor\(s\) were not converted: bias[\s\S]*left at their"
    ):
        cov.check()
    summary = cov.summary()
    expected = {"source_tensors": 4, "source_tied_aliases": ["lm_head"], "target_tensors": 2}
    assert summary == {**expected, "local_spec_norms_remapped": 0}, summary
    assert json.loads(json.dumps(summary)) == summary  # JSON as it is
