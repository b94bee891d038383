"""The cluster recipes: layouts that divide, and per-GPU memory estimates that fit an H100.

The estimate's parameter counts are checked here against the published sizes of the models the
recipes name, and per rank against megatron-core in tests/distributed/test_memory_estimate.py.
"""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import pytest
from helpers.paths import ROOT
from helpers.trace_fixtures import prepare_store

from nemo_dcod.cli import main
from nemo_dcod.config import load_config
from nemo_dcod.train.config import TrainConfig
from nemo_dcod.train.memory import (
    GIB,
    Architecture,
    Layout,
    MemoryEstimate,
    forward_memory,
    train_memory,
)


def _architecture(family: str, size: str, vocab: int, **changes: object) -> Architecture:
    from nemo_dcod.model.families import family_config_class

    fields = {f.name: f.default for f in dataclasses.fields(family_config_class(family, size))}
    fields.update(changes)
    return Architecture.of(SimpleNamespace(**fields), vocab)


@pytest.mark.parametrize(
    ("family", "size", "vocab", "tied", "published"),
    [
        ("llama3.1", "8b", 128256, False, 8_030_261_248),  # Llama-3.1-8B safetensors total
        ("llama3.1", "70b", 128256, False, 70_553_706_496),  # Llama-3.1/3.3-70B
        ("qwen2.5", "7b", 152064, False, 7_615_616_512),  # Qwen2.5-7B (QKV bias)
        ("qwen2.5", "0.5b", 151936, True, 494_032_768),  # Qwen2.5-0.5B (tied embeddings)
        ("qwen3", "8b", 151936, False, 8_190_735_360),  # Qwen3-8B (QK-norm)
    ],
)
def test_parameter_counts_equal_the_published_sizes(
    family: str, size: str, vocab: int, tied: bool, published: int
) -> None:
    arch = _architecture(family, size, vocab, share_embeddings_and_output_weights=tied)
    assert arch.total_parameters() == published


def test_estimate_responds_to_each_memory_saving_setting() -> None:
    arch = _architecture("llama3.1", "8b", 128256)
    base = Layout(tensor_model_parallel_size=2, data_parallel_size=16, seq_length=8192, num_microbatches=8)
    plain = train_memory(arch, base)
    # Megatron's bf16 Adam: 2 + 4 + 12 bytes per parameter; the distributed optimizer splits the 12.
    assert (plain.weights, plain.gradients, plain.optimizer) == tuple(
        plain.parameters * b for b in (2, 4, 12)
    )
    sharded = train_memory(arch, dataclasses.replace(base, distributed_optimizer=True))
    assert sharded.optimizer == pytest.approx(plain.optimizer / 16)
    assert (
        train_memory(arch, dataclasses.replace(base, sequence_parallel=True)).activations < plain.activations
    )
    unfused = train_memory(arch, dataclasses.replace(base, fused_attention=False))
    assert unfused.activations > 2 * plain.activations  # the [s, s] scores at 8k tokens dominate
    chunked = train_memory(arch, dataclasses.replace(base, loss_chunk_rows=1024))
    assert chunked.logits < plain.logits
    # 1F1B: the first stage holds PP micro-batches of its (half of the) layers; interleaving a bit more.
    pp2 = train_memory(arch, dataclasses.replace(base, pipeline_model_parallel_size=2))
    assert pp2.parameters < plain.parameters
    assert pp2.activations == pytest.approx(plain.activations, rel=0.02)
    vpp = train_memory(
        arch,
        dataclasses.replace(base, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    )
    assert vpp.activations == pytest.approx(pp2.activations * 1.25)
    fp32 = train_memory(arch, dataclasses.replace(base, bf16=False))
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == tuple(fp32.parameters * b for b in (4, 4, 8))
    forward = forward_memory(arch, base)
    assert forward.gradients == forward.optimizer == 0 and forward.total < plain.total


def test_describe_says_whether_it_fits() -> None:
    small = MemoryEstimate("x", 1, weights=10 * GIB, gradients=0, optimizer=0, activations=0, logits=0)
    assert small.fits(72) and "fits in 72 GiB" in small.describe(72)
    assert not small.fits(8) and "DOES NOT FIT" in small.describe(8)


@pytest.fixture(scope="module")
def store_8b(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real store of the 8B recipe's shape: 8192-token rows, Llama 3's 128256-token vocabulary."""
    return prepare_store(tmp_path_factory.mktemp("store8b"), 8192, 128256)


def _slurm_default(name: str) -> int:
    text = (ROOT / "slurm" / "distill_70b_to_8b.sh").read_text()
    match = re.search(rf"^{name}=\$\{{{name}:-(\d+)\}}", text, re.MULTILINE)
    assert match, f"no default for {name} in slurm/distill_70b_to_8b.sh"
    return int(match.group(1))


def test_train_recipe_matches_the_sbatch_layout_and_fits(
    capsys: pytest.CaptureFixture[str], store_8b: str
) -> None:
    cfg = load_config(TrainConfig, ROOT / "conf" / "distill_llama8b.yaml", check=False)
    assert cfg.trainer.num_nodes == _slurm_default("TRAIN_NODES")
    assert cfg.trainer.devices == _slurm_default("GPUS_PER_NODE")
    assert cfg.parallel.tensor_model_parallel_size <= cfg.trainer.devices  # TP within a node (NVLink)
    assert main(["train", "--config", "conf/distill_llama8b.yaml", "--dry-run", f"data.path={store_8b}"]) == 0
    out = capsys.readouterr().out
    print(out)  # the estimate, in the test log
    assert "32 ranks = TP 2 x PP 1 x CP 1 x DP 16" in out
    gib = float(re.search(r"memory estimate per GPU \(training.*?\): ([\d.]+) GiB", out).group(1))  # type: ignore[union-attr]
    assert 30 < gib < 72, out


def test_dry_run_refuses_a_layout_that_does_not_fit(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, store_8b: str
) -> None:
    # The 8B student unsharded: 16 bytes a parameter for weights, gradients and Adam alone.
    args = ["train", "--config", "conf/distill_llama8b.yaml", "--dry-run", f"data.path={store_8b}"]
    args += ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"]
    args += ["parallel.use_distributed_optimizer=false"]
    assert main(args) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    # The limit is a setting: GPUs with (much) more memory take the same layout.
    monkeypatch.setenv("DCOD_GPU_MEMORY_GIB", "400")
    assert main(args) == 0
    assert "fits in 400 GiB per GPU" in capsys.readouterr().out
    monkeypatch.setenv("DCOD_GPU_MEMORY_GIB", "lots")
    assert main(args) == 2
    assert "DCOD_GPU_MEMORY_GIB='lots'" in capsys.readouterr().err


def test_dry_run_reports_config_problems(capsys: pytest.CaptureFixture[str], store_8b: str) -> None:
    args = ["train", "--config", "conf/distill_llama8b.yaml", "--dry-run", "trainer.global_batch_size=100"]
    args.append(f"data.path={store_8b}")
    assert main(args) == 2
    assert "global_batch_size=100 is not divisible" in capsys.readouterr().err


def test_family_shapes_read_from_nemo_source_equal_nemo_config_classes() -> None:
    """The validation reads shapes from NeMo's source (no NeMo import); they are NeMo's classes'."""
    from nemo_dcod.model.families import FAMILIES, TINY, architecture, family_config_class

    for family, sizes in FAMILIES.items():
        for size in sizes:
            shape = architecture(family, size)
            if size == "tiny":
                assert shape == {k: TINY[k] for k in shape}
                continue
            defaults = {f.name: f.default for f in dataclasses.fields(family_config_class(family, size))}
            groups = defaults["num_query_groups"] or defaults["num_attention_heads"]
            assert shape == {
                **{k: defaults[k] for k in shape if k != "num_query_groups"},
                "num_query_groups": groups,
            }
    with pytest.raises(ValueError, match=r"llama3\.1 has sizes tiny, 8b, 70b"):
        architecture("llama3.1", "13b")  # an unknown size is an error, not the tiny shape
