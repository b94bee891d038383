"""GPU tests (skipped without CUDA): the compiled weight chain, FP8 really active, TE on THD rows.

Run on a GPU machine: ``pytest -m gpu tests/gpu`` (``scripts/gpu_check.sh`` does). The training
tests need NeMo + megatron-core; the FP8 and THD ones also Transformer Engine, and are skipped
without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.paths import ROOT

from nemo_dcod.losses import LossContext, LossInputs, build_loss
from nemo_dcod.losses import weights as wts
from nemo_dcod.losses.types import WeightStats

pytestmark = pytest.mark.gpu


def _inputs(rows: int = 2, cols: int = 4096, seed: int = 0) -> LossInputs:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    lq = (-8 * torch.rand(rows, cols, device="cuda", generator=gen)).requires_grad_()
    lp = -8 * torch.rand(rows, cols, device="cuda", generator=gen)
    mask = torch.ones(rows, cols, device="cuda")
    mask[:, :100] = 0
    return LossInputs(student_logprobs=lq, loss_mask=mask, teacher_logprobs=lp)


def _cuda_kernels(fn: object) -> int:
    """CUDA kernels launched by ``fn()`` (memory copies and sets not counted)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()  # type: ignore[operator]
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for n in names if "memcpy" not in n.lower() and "memset" not in n.lower())


def test_fused_chain_compiles_on_cuda_matches_and_launches_fewer_kernels() -> None:
    """On CUDA the chain is compiled (no fallback), gives the step-by-step values, gradients and
    diagnostics, and launches far fewer kernels (one compiled function instead of ~40 small ops
    plus host syncs)."""
    ctx = LossContext(step=1, total_steps=2, stats=WeightStats(delta_mean=-0.5, g_mean=0.3), validate=False)
    fused, unfused = build_loss("discord", center=True), build_loss("discord", center=True, fused=False)
    results = {}
    for name, loss in (("fused", fused), ("unfused", unfused)):
        inputs = _inputs()
        out = loss(inputs, ctx)
        (grad,) = torch.autograd.grad(out[0], inputs.student_logprobs)
        results[name] = (out, grad)
    assert wts.fusion_fallbacks() == [], wts.fusion_fallbacks()
    (f_out, f_grad), (u_out, u_grad) = results["fused"], results["unfused"]
    torch.testing.assert_close(f_out[0], u_out[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(f_grad, u_grad, rtol=1e-5, atol=1e-6)
    for key, value in u_out[2].items():
        torch.testing.assert_close(f_out[2][key].cpu(), value.cpu(), rtol=1e-5, atol=1e-3, msg=key)
    inputs = _inputs(seed=1)
    fused_kernels = _cuda_kernels(lambda: fused(inputs, ctx))
    unfused_kernels = _cuda_kernels(lambda: unfused(inputs, ctx))
    print(f"CUDA kernels of the loss forward: fused {fused_kernels}, step by step {unfused_kernels}")
    assert fused_kernels < 0.6 * unfused_kernels, (fused_kernels, unfused_kernels)


# ----------------------------------------------------------------------------------------------
# Transformer Engine: FP8 really active, THD packed rows equal to the local spec's dense mask.
# ----------------------------------------------------------------------------------------------

FP8_PROBE = r"""
import json, sys
from nemo_dcod.config import load_config
from nemo_dcod.train import run as train_run
from nemo_dcod.train.config import TrainConfig

cfg = load_config(TrainConfig, sys.argv[2], sys.argv[3:])
built = {}
build_model = train_run.build_model

def keep(c, *a, **kw):
    built["model"] = build_model(c, *a, **kw)
    return built["model"]

train_run.build_model = keep
train_run.run_train(cfg)
from transformer_engine.pytorch.module.base import TransformerEngineBaseModule
report = []
for name, module in built["model"].named_modules():
    if isinstance(module, TransformerEngineBaseModule):
        meta = getattr(module, "fp8_meta", {}) or {}
        fwd = meta.get("scaling_fwd")
        history = getattr(fwd, "amax_history", None)
        report.append({
            "name": name,
            "fp8_initialized": bool(getattr(module, "fp8_initialized", False)),
            "amax_sum": float(history.float().abs().sum()) if history is not None else None,
        })
json.dump(report, open(sys.argv[1], "w"))
"""


def _tiny_overrides(run_dir: Path, *extra: str) -> list[str]:
    return [
        f"run_dir={run_dir}",
        "trainer.devices=1",
        "parallel.tensor_model_parallel_size=1",
        "trainer.max_steps=3",
        "trainer.val_check_interval=0",
        "trainer.ckpt_every_n_steps=3",
        "optim.warmup_steps=0",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}


def test_fp8_is_really_active_after_a_step(tmp_path: Path) -> None:
    """precision.fp8=hybrid with the TE spec: after training, the TE modules inside the bf16
    margins have initialised FP8 and a non-zero amax history (delayed scaling recorded real
    activations), the first and last layers kept in bf16 have none."""
    pytest.importorskip("nemo.collections.llm", reason="NeMo is not installed on this GPU machine")
    pytest.importorskip("transformer_engine.pytorch", reason="FP8 needs Transformer Engine")
    report_path = tmp_path / "fp8.json"
    args = _tiny_overrides(
        tmp_path / "run", "precision.dtype=bf16", "model.spec=te", "precision.fp8=hybrid",
        "precision.fp8_recipe=delayed",
    )  # fmt: skip
    cmd = [sys.executable, "-c", FP8_PROBE, str(report_path), str(ROOT / "conf/train_tiny.yaml"), *args]
    subprocess.run(cmd, check=True, timeout=900, env=_env())
    report = json.loads(report_path.read_text())
    active = [r for r in report if r["fp8_initialized"] and (r["amax_sum"] or 0) > 0]
    assert active, f"no TE module ran in FP8: {report}"
    assert any(".layers.0." in r["name"] and not r["fp8_initialized"] for r in report) or all(
        ".layers.0." not in r["name"] for r in active
    ), "the first layer should stay in bf16 (first_last_layers_bf16)"


def _train_store(tmp: Path, name: str, store: str, *extra: str) -> list[dict]:
    run_dir = tmp / name
    cmd = [sys.executable, "-m", "nemo_dcod.cli", "train", "--config", str(ROOT / "conf/train_tiny.yaml")]
    cmd += _tiny_overrides(
        run_dir, "data.source=store", f"data.path={store}", "data.vocab_size=256", "data.seq_length=128",
        "trainer.global_batch_size=2", "trainer.micro_batch_size=1", "loss.name=sft", *extra,
    )  # fmt: skip
    subprocess.run(cmd, check=True, timeout=900, env=_env())
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_te_on_packed_rows_matches_the_local_spec(tmp_path: Path) -> None:
    """A packed store (several documents per row) trained with the TE spec (THD: PackedSeqParams)
    and with the local spec (dense block-diagonal mask) from the same seed: the first step's loss
    agrees (fp32; different attention kernels). Attention across documents would change it."""
    pytest.importorskip("nemo.collections.llm", reason="NeMo is not installed on this GPU machine")
    pytest.importorskip("transformer_engine.pytorch", reason="THD needs Transformer Engine")
    from helpers.trace_fixtures import prepare_store

    store = prepare_store(tmp_path / "data", seq_length=128, vocab_size=256)
    manifest = json.loads((Path(store) / "manifest.json").read_text())
    assert manifest["counts"]["documents"] > manifest["counts"]["rows"], "the store must pack documents"
    local = _train_store(tmp_path, "local", store, "model.spec=local")
    te = _train_store(tmp_path, "te", store, "model.spec=te")
    assert abs(te[0]["loss"] - local[0]["loss"]) < 2e-3 * abs(local[0]["loss"]), (te[0], local[0])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in te)
