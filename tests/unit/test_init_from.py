"""`model.init_from` problems, each a config error naming the field, before anything is built.

The checks read what a NeMo 2 checkpoint records (``context/model.yaml``'s model config and
``context/nemo_tokenizer/tokenizer.json``), so the checkpoint here is those two files, written as
NeMo writes them (the weights are never read by these checks), next to a store ``prepare`` makes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.paths import ROOT
from helpers.trace_fixtures import prepare_store

from nemo_dcod.cli import main
from nemo_dcod.config import ConfigError, load_config
from nemo_dcod.train.config import TrainConfig

TARGET = "nemo.collections.llm.gpt.model.llama.Llama31Config8B"
PLAIN = "nemo.collections.llm.gpt.model.llama.LlamaConfig"  # what `import` records without rope_scaling
SCALED = "nemo.collections.llm.gpt.model.llama.Llama31Config"  # ... and with Llama 3's scaling
LLAMA31 = {"rotary_base": 500000, "layernorm_epsilon": 1e-5, "share_embeddings_and_output_weights": False}


def _checkpoint(root: Path, tokenizer: str, **config: Any) -> Path:
    """A checkpoint's context: its model config (the tiny Llama 3.1's shape) and its tokenizer."""
    ckpt = root / "ckpt"
    (ckpt / "context").mkdir(parents=True)
    fields = {
        "_target_": TARGET,
        "vocab_size": 256,
        "num_layers": 4,
        "hidden_size": 64,
        "ffn_hidden_size": 128,
    }
    fields |= {"num_attention_heads": 4, "num_query_groups": 2, "scale_factor": 8.0} | LLAMA31 | config
    if fields["_target_"] == PLAIN:
        del fields["scale_factor"]
    (ckpt / "context" / "model.yaml").write_text(yaml.safe_dump({"config": fields}))
    shutil.copytree(tokenizer, ckpt / "context" / "nemo_tokenizer")
    return ckpt


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return prepare_store(tmp_path_factory.mktemp("store"), 128, 209)


def _problems(store: str, ckpt: Path, *overrides: str) -> str:
    args = [f"data.path={store}", "data.vocab_size=209", f"model.init_from={ckpt}", *overrides]
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, ROOT / "conf" / "train_store_tiny.yaml", args)
    return str(err.value)


def _swapped(tokenizer: str, out: Path) -> str:
    """The same tokenizer with two ids exchanged: the same size, other meanings."""
    shutil.copytree(tokenizer, out)
    data = json.loads((out / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["w1"], vocab["w2"] = vocab["w2"], vocab["w1"]
    (out / "tokenizer.json").write_text(json.dumps(data))
    return str(out)


def test_a_matching_checkpoint_is_accepted(store: str, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, str(Path(store).parent / "tok"))
    args = [f"data.path={store}", "data.vocab_size=209", f"model.init_from={ckpt}"]
    assert load_config(TrainConfig, ROOT / "conf" / "train_store_tiny.yaml", args).model.init_from == str(
        ckpt
    )


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ({"vocab_size": 128}, (), "data.vocab_size=209: larger than the 128 embedding rows"),
        (
            {"vocab_size": 257},
            (),
            "parallel.tensor_model_parallel_size=2 does not divide the 257 vocabulary rows",
        ),
        ({}, ("model.num_layers=8",), "model.num_layers=8: model.init_from="),
        (
            {"_target_": "nemo.collections.llm.gpt.model.qwen2.Qwen2Config"},
            (),
            "holds a nemo.collections.llm.gpt.model.qwen2.Qwen2Config, not a model.family=llama3.1 model",
        ),
        (
            {"_target_": PLAIN, "rotary_base": 100000},
            (),
            "model.family=llama3.1 contradicts model.init_from=",
        ),
        ({"rotary_base": 100000}, (), "llama3.1 has rotary_base=500000, the checkpoint 100000"),
        ({"layernorm_epsilon": 1e-6}, (), "llama3.1 has layernorm_epsilon=1e-05, the checkpoint 1e-06"),
        (
            {"share_embeddings_and_output_weights": True},
            (),
            "llama3.1 has share_embeddings_and_output_weights=False, the checkpoint True",
        ),
        (
            {"_target_": SCALED, "scale_factor": 32.0, "share_embeddings_and_output_weights": True},
            (),
            "leave model.family null (the checkpoint is a llama3.2 model)",
        ),
        (
            {"_target_": SCALED, "scale_factor": 8.0},
            ("model.family=llama",),
            "llama has no Llama 3's RoPE scaling, the checkpoint has. Training it as llama",
        ),
    ],
    ids=[
        "vocabulary_too_large",
        "tp_does_not_divide_rows",
        "override_contradicts",
        "another_family",
        "plain_llama_as_llama31",
        "rope_base",
        "norm_eps",
        "tied_embeddings",
        "llama32_scaling_as_llama31",
        "scaled_as_plain_llama",
    ],
)
def test_init_from_problems(
    store: str, tmp_path: Path, config: dict[str, Any], overrides: tuple[str, ...], message: str
) -> None:
    ckpt = _checkpoint(tmp_path, str(Path(store).parent / "tok"), **config)
    assert message in _problems(store, ckpt, *overrides)


def test_a_store_of_another_tokenizer_of_the_same_size_is_refused(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = _swapped(str(Path(store).parent / "tok"), tmp_path / "other_tok")
    ckpt = _checkpoint(tmp_path, other)
    text = _problems(store, ckpt)
    assert "the store's tokenizer" in text and "its token ids would mean other tokens" in text
    assert "2 id(s) map to different tokens" in text and "'w1' (store) vs 'w2' (model)" in text
    # The dry run refuses it too, before a job is submitted.
    args = ["train", "--config", "conf/train_store_tiny.yaml", "--dry-run", f"data.path={store}"]
    assert main([*args, "data.vocab_size=209", f"model.init_from={ckpt}"]) == 2
    assert "its token ids would mean other tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "family"),
    [
        ({"_target_": PLAIN, "rotary_base": 100000, "share_embeddings_and_output_weights": True}, "llama"),
        ({}, "llama3.1"),
        ({"_target_": SCALED, "scale_factor": 32.0, "share_embeddings_and_output_weights": True}, "llama3.2"),
        ({"_target_": "nemo.collections.llm.gpt.model.qwen2.Qwen2Config", "rotary_base": 10000}, "qwen2.5"),
    ],
    ids=["plain_llama", "llama31", "llama32", "qwen2"],
)
def test_a_null_family_is_the_checkpoints(
    store: str, tmp_path: Path, config: dict[str, Any], family: str
) -> None:
    """model.family=null takes the family the checkpoint fits: a plain Llama (SmolLM2: base 100000,
    tied, no scaling) is trained as NeMo's LlamaConfig, never with Llama 3.1's RoPE scaling."""
    ckpt = _checkpoint(tmp_path, str(Path(store).parent / "tok"), **config)
    args = [f"data.path={store}", "data.vocab_size=209", f"model.init_from={ckpt}", "model.family=null"]
    cfg = load_config(TrainConfig, ROOT / "conf" / "train_store_tiny.yaml", args)
    assert cfg.model.family is None and cfg.student_family() == family


def test_the_same_settings_after_an_fp32_round_trip_are_accepted(store: str, tmp_path: Path) -> None:
    """rms_norm_eps 1e-5 read back from fp32 (as a GGUF stores it) is 1e-5, not a contradiction."""
    ckpt = _checkpoint(tmp_path, str(Path(store).parent / "tok"), layernorm_epsilon=9.999999747378752e-06)
    args = [f"data.path={store}", "data.vocab_size=209", f"model.init_from={ckpt}"]
    cfg = load_config(TrainConfig, ROOT / "conf" / "train_store_tiny.yaml", args)
    assert cfg.student_family() == "llama3.1"


def test_family_settings_are_nemos_for_every_size() -> None:
    """What FAMILY_SETTINGS says a family fixes is what NeMo's class of each of its sizes sets (read
    from NeMo's source), and only Llama 3's classes apply RoPE scaling."""
    from nemo_dcod.model.families import FAMILIES, FAMILY_SETTINGS, _all_classes, _ancestors

    classes = _all_classes()
    for family, sizes in FAMILIES.items():
        for size, name in sizes.items():
            resolved: dict[str, Any] = {}
            chain = [name]
            while chain[-1] in classes and classes[chain[-1]][0]:
                chain.append(classes[chain[-1]][0][0])
            for cls in reversed(chain):
                resolved.update(classes.get(cls, ([], {}))[1])
            settings = FAMILY_SETTINGS[family]
            scales = "Llama31Config" in _ancestors(name, classes)
            assert settings["rope_scaling"] == scales, (family, size)
            for key, value in settings.items():
                if key != "rope_scaling":
                    assert resolved[key] == pytest.approx(value), (family, size, key)
