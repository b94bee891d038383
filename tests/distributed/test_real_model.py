"""The whole chain on a real pretrained model: SmolLM2-135M-Instruct (``helpers/real_model.py``).

Real weights, a real 49,152-token BPE and ChatML template, 30 layers, 9 heads / 3 KV heads (TP=3;
TP=2 divides neither), tied embeddings, RoPE base 100000 with no scaling. Every stage runs as a user
runs it (the CLI, in its own processes), on the full model:

* ``import`` verifies at the fp32 bound scaled to the model with >= 10x margin, and its export back
  is bit-identical per tensor, with the tokenizer, template, context length and stop ids kept;
* the verifier fails planted conversion errors on it (one layer's gate/up swapped; RoPE base 1% off);
* ``score`` refuses TP=2 before it marks the store (and ``--dry-run`` refuses it too), and scores at TP=3;
* ``train`` from the import (``model.family`` left null: the plain Llama family, no RoPE scaling)
  at TP=3: the student's step-1 log-probs equal the scored ones (Δ std <= 1e-4; with Llama 3.1's
  scaling it was 0.07), SFT and DisCorD have the same first-step loss, one checkpoint write per step;
* the trained student's export verifies, keeps the model's context length and stop ids, no
  ``rope_scaling``; ``export`` takes the run's ``checkpoints/`` folder;
* ``eval`` runs the export on a handful of problems.

13.5 minutes wall on a shared 2-core machine at load ~12 (2026-12-08), 5 CPU-minutes in all
(processes included); the model is converted from its GGUF once per machine (~30 s CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers.paths import ROOT
from helpers.real_model import NUM_HEADS, NUM_KV_HEADS, NUM_LAYERS, TENSOR_PARALLEL, TRACES, RealModel

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SEQ = 64


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """A stage as a user runs it; no OMP_NUM_THREADS: the stages size their own thread pools."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "nemo_dcod.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    return proc.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real_model")


@pytest.fixture(scope="module")
def imported(real_model: RealModel, work: Path) -> Path:
    out = work / "import"
    _ok(_cli("import", "--hf", str(real_model.hf_dir), "--out", str(out)))
    return out


@pytest.fixture(scope="module")
def store(real_model: RealModel, work: Path) -> Path:
    """Six short chats tokenized with the model's own tokenizer and ChatML template, one per row."""
    from nemo_dcod.data.config import PrepareConfig
    from nemo_dcod.data.prepare import run_prepare

    traces = work / "traces.jsonl"
    traces.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in TRACES))
    cfg = PrepareConfig(
        inputs=[str(traces)],
        tokenizer=str(real_model.hf_dir),
        out_dir=str(work / "store"),
        seq_length=SEQ,
        packing="none",
    )
    run_prepare(cfg, quiet=True)
    return Path(cfg.out_dir)


def _score_args(imported: Path, store: Path, tp: int) -> list[str]:
    return [
        "score",
        f"checkpoint={imported}",
        f"store={store}",
        "topk=4",
        "dtype=fp32",
        f"trainer.devices={tp}",
        f"parallel.tensor_model_parallel_size={tp}",
        "trainer.micro_batch_size=1",
    ]


@pytest.fixture(scope="module")
def scored(imported: Path, store: Path) -> Path:
    _ok(_cli(*_score_args(imported, store, TENSOR_PARALLEL)))
    return store


def _train(work: Path, imported: Path, store: Path, loss: str) -> Path:
    run_dir = work / f"train_{loss}"
    _ok(
        _cli(
            "train",
            f"run_dir={run_dir}",
            f"model.init_from={imported}",
            "data.source=store",
            f"data.path={store}",
            f"data.vocab_size={49152}",
            f"data.seq_length={SEQ}",
            "data.num_val_samples=0",
            "data.shuffle=false",
            f"trainer.devices={TENSOR_PARALLEL}",
            f"parallel.tensor_model_parallel_size={TENSOR_PARALLEL}",
            "trainer.max_steps=2",
            "trainer.global_batch_size=1",
            "trainer.micro_batch_size=1",
            "trainer.ckpt_every_n_steps=2",
            "optim.warmup_steps=0",
            "optim.lr=1e-5",
            "optim.min_lr=1e-6",
            f"loss.name={loss}",
        )
    )
    return run_dir


@pytest.fixture(scope="module")
def trained(work: Path, imported: Path, scored: Path) -> dict[str, Path]:
    return {loss: _train(work, imported, scored, loss) for loss in ("discord", "sft")}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out |= load_file(file)
    return out


def _config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def test_import_verifies_with_margin_and_exports_back_bit_identical(
    real_model: RealModel, imported: Path, work: Path
) -> None:
    verify = json.loads((imported / "conversion.json").read_text())["verify"]
    assert verify["passed"] and verify["dtype"] == "fp32", verify
    assert verify["fp32_bound"]["num_layers"] == NUM_LAYERS
    # Measured 2026-12-08: max |dlogit| 9.92e-5 against 5.20e-3 (logits up to 41.5): 52x.
    assert verify["tolerance"] >= 10 * verify["max_abs_logit_diff"], verify
    model_yaml = yaml.safe_load((imported / "context" / "model.yaml").read_text())
    assert model_yaml["config"]["_target_"].endswith(".LlamaConfig")  # no RoPE scaling recorded

    back = work / "export_import"
    _ok(_cli("export", "--checkpoint", str(imported), "--hf-out", str(back)))
    original, exported = _tensors(real_model.hf_dir), _tensors(back)
    assert sorted(original) == sorted(exported)
    different = [name for name in original if not torch.equal(original[name], exported[name])]
    assert not different, different[:5]
    config = _config(back)
    assert config["max_position_embeddings"] == real_model.config["max_position_embeddings"] == 8192
    assert config.get("rope_scaling") is None and config["rope_theta"] == real_model.config["rope_theta"]
    assert config["tie_word_embeddings"] and config["eos_token_id"] == real_model.eos_token_id
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (back / name).read_text() == (real_model.hf_dir / name).read_text(), name


def test_verifier_fails_planted_errors_on_the_real_model(real_model: RealModel, imported: Path) -> None:
    """The same NeMo logits against transformers' logits of the true model (passes, >= 10x inside
    the bound) and of two wrong conversions (fail): one layer's gate and up projections swapped,
    and the RoPE base 1% off (101000 for 100000)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_dcod.convert.config import VerifySection
    from nemo_dcod.convert.verify import compare_logits, hf_logits, verification_rows
    from nemo_dcod.model.loading import load_nemo_model, megatron_parallel, nemo_logits
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode

    enable_cpu_mode()
    tokenizer = AutoTokenizer.from_pretrained(str(real_model.hf_dir))
    rows = verification_rows(tokenizer, VerifySection(), len(tokenizer))
    with megatron_parallel(1):
        mcore, _ = load_nemo_model(imported, torch.float32)
        nemo = nemo_logits(mcore, rows)
        del mcore
    assert nemo is not None
    shape = (NUM_LAYERS, real_model.config["hidden_size"])

    def against(**kwargs: Any) -> Any:
        model = AutoModelForCausalLM.from_pretrained(str(real_model.hf_dir), dtype=torch.float32, **kwargs)
        return model

    true = against()
    ok = compare_logits(hf_logits(true, rows), nemo, torch.float32, None, model_shape=shape)
    assert ok.passed and ok.margin is not None and ok.margin >= 10, ok.describe("true")
    mlp = true.model.layers[NUM_LAYERS // 2].mlp
    with torch.no_grad():
        gate = mlp.gate_proj.weight.clone()
        mlp.gate_proj.weight.copy_(mlp.up_proj.weight)
        mlp.up_proj.weight.copy_(gate)
    swapped = compare_logits(hf_logits(true, rows), nemo, torch.float32, None, model_shape=shape)
    assert not swapped.passed and swapped.max_abs > 100 * swapped.tolerance, swapped.describe("swap")
    del true
    rope = against(rope_theta=real_model.config["rope_theta"] * 1.01)
    off = compare_logits(hf_logits(rope, rows), nemo, torch.float32, None, model_shape=shape)
    # Measured 2026-12-08: 0.095 over the default 32-token rows, 18x the bound (gate/up: 9.1).
    assert not off.passed and off.max_abs > 10 * off.tolerance, off.describe("rope")


def test_score_refuses_a_tp_that_does_not_divide_the_heads_before_marking(
    imported: Path, store: Path
) -> None:
    assert NUM_HEADS % 2 and NUM_KV_HEADS % 2
    before = sorted(p.name for p in store.iterdir())
    for extra in ((), ("--dry-run",)):
        proc = _cli(*_score_args(imported, store, 2), *extra)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "tensor_model_parallel_size=2" in proc.stderr and "9" in proc.stderr, proc.stderr[-3000:]
        assert sorted(p.name for p in store.iterdir()) == before  # no scoring.json left behind


def test_train_from_the_import_keeps_the_model(trained: dict[str, Path], scored: Path) -> None:
    metrics = {
        loss: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for loss, run in trained.items()
    }
    discord, sft = metrics["discord"], metrics["sft"]
    assert [r["step"] for r in discord] == [1, 2] and [r["step"] for r in sft] == [1, 2]
    # Teacher = the imported model scored at TP=3: at step 1 the student (the same weights, built
    # as the plain Llama family) gives the same log-probs. Under Llama 3.1's RoPE scaling: 0.070.
    first = discord[0]
    assert abs(first["delta_mean"]) <= 1e-4 and first["delta_std"] <= 1e-4, first
    # DisCorD's first step has λ = 0 (no statistics yet): SFT's loss on the same batch.
    assert first["loss"] == pytest.approx(sft[0]["loss"], rel=1e-6), (first, sft[0])
    config = yaml.safe_load((trained["discord"] / "config.yaml").read_text())
    assert config["model"]["family"] is None
    # One write per checkpoint step: the -last checkpoint is a link to the step's own.
    entries = sorted((trained["discord"] / "checkpoints").iterdir())
    real = [p for p in entries if not p.is_symlink()]
    links = [p for p in entries if p.is_symlink()]
    assert len(real) == 1 and real[0].name.startswith("step=1-"), entries
    assert len(links) == 1 and links[0].resolve() == real[0].resolve(), entries


@pytest.fixture(scope="module")
def student_hf(trained: dict[str, Path], work: Path) -> Path:
    out = work / "student_hf"
    # The run's checkpoints/ folder, as score takes it: its newest complete checkpoint.
    _ok(_cli("export", "--checkpoint", str(trained["discord"] / "checkpoints"), "--hf-out", str(out)))
    return out


def test_the_trained_students_export_is_the_models(real_model: RealModel, student_hf: Path) -> None:
    report = json.loads((student_hf / "conversion.json").read_text())
    # Measured 2026-12-08: NeMo -> HF max |dlogit| 2.9e-4 against 5.2e-3 (18x).
    for key in ("verify_nemo", "verify_hf"):
        verify = report[key]
        assert verify["passed"] and verify["tolerance"] >= 10 * verify["max_abs_logit_diff"], (key, verify)
    config = _config(student_hf)
    assert config["max_position_embeddings"] == 8192, config  # not the training rows' 64
    assert config.get("rope_scaling") is None and config["rope_theta"] == real_model.config["rope_theta"]
    assert config["eos_token_id"] == real_model.eos_token_id
    generation = json.loads((student_hf / "generation_config.json").read_text())
    imported_generation = json.loads((real_model.hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == imported_generation["eos_token_id"]
    assert (student_hf / "chat_template.jinja").read_text() == (
        real_model.hf_dir / "chat_template.jinja"
    ).read_text()


def test_eval_runs_the_exported_student(student_hf: Path, work: Path) -> None:
    cfg = {
        "models": [{"path": str(student_hf), "label": "student"}],
        "benchmarks": [{"name": "gsm8k", "format": "gsm8k", "path": str(ROOT / "examples/eval/gsm8k.jsonl")}],
        "sampling": {"temperature": 0.0, "num_samples": 1, "max_new_tokens": 24},
        "backend": "transformers",
        "device": "cpu",
        "batch_size": 3,
        "out_dir": str(work / "eval"),
    }
    (work / "eval.yaml").write_text(yaml.safe_dump(cfg))
    _ok(_cli("eval", "--config", str(work / "eval.yaml")))
    results = json.loads((work / "eval" / "results.json").read_text())
    text = json.dumps(results)
    assert "student" in text and "gsm8k" in text, text[:2000]
