"""GPU tests (skipped without CUDA): the ops and losses on CUDA bf16, and bf16/FP8 training.

Run on a GPU machine: ``pytest -m gpu tests/gpu``. The training tests need NeMo + megatron-core
installed (``pip install -e .``) and are skipped otherwise; the FP8 one also needs Transformer
Engine (``pip install -e '.[gpu]'``).
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

from nemo_dcod.losses import LossContext, build_loss
from nemo_dcod.parallel.loss_inputs import loss_from_logits
from nemo_dcod.parallel.vocab_parallel import vocab_parallel_logprobs

pytestmark = pytest.mark.gpu


def _batch(rows: int, cols: int, vocab: int, k: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    logits = (3 * torch.randn(rows, cols, vocab + 64, device="cuda", generator=gen)).to(torch.bfloat16)
    teacher = torch.log_softmax(torch.randn(rows, cols, vocab, device="cuda", generator=gen), -1)
    labels = torch.randint(0, vocab, (rows, cols), device="cuda", generator=gen)
    top = teacher.topk(k, dim=-1)
    mask = torch.ones(rows, cols, device="cuda")
    mask[:, :3] = 0
    batch = {
        "labels": labels,
        "loss_mask": mask,
        "teacher_logprobs": teacher.gather(-1, labels[..., None])[..., 0],
        "teacher_topk_ids": top.indices,
        "teacher_topk_logprobs": top.values,
    }
    return logits, batch


@pytest.mark.parametrize("chunk_size", [None, 512])
def test_logprobs_on_cuda_bf16_match_float64(chunk_size: int | None) -> None:
    """bf16 logits with a padded vocabulary: values and gradients equal the float64 computation on
    the same (bf16-rounded) logits; the gradient comes back in bf16, so compare at bf16 precision."""
    vocab = 32000
    logits, batch = _batch(4, 512, vocab, k=8)
    ids = torch.cat([batch["labels"][..., None], batch["teacher_topk_ids"]], -1)
    x = logits.detach().requires_grad_(True)
    out = vocab_parallel_logprobs(
        x, ids, vocab_size=vocab, with_tail=True, tail_from=1, chunk_size=chunk_size
    )
    weights = torch.randn_like(out.logprobs)
    ((out.logprobs * weights).sum() + out.tail_logprobs.sum()).backward()

    ref_x = logits.detach().double()[..., :vocab].requires_grad_(True)
    lq = torch.log_softmax(ref_x, -1)
    ref = lq.gather(-1, ids)
    tail = torch.log1p(-ref[..., 1:].exp().sum(-1))
    ((ref * weights.double()).sum() + tail.sum()).backward()
    torch.testing.assert_close(out.logprobs.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.tail_logprobs.double(), tail, rtol=1e-4, atol=1e-4)
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert torch.count_nonzero(x.grad[..., vocab:]) == 0
    torch.testing.assert_close(x.grad[..., :vocab].double(), ref_x.grad, rtol=2e-2, atol=2e-3)


def test_chunking_lowers_cuda_peak_memory() -> None:
    """With chunk_size the op never holds an fp32 copy of the whole shard: peak extra memory of
    forward + backward, beyond the bf16 gradient itself, is well below the unchunked op's (which
    keeps the fp32 softmax)."""
    vocab = 65536
    logits, batch = _batch(2, 2048, vocab, k=4)
    peaks = {}
    for chunk in (None, 1024):
        x = logits.detach().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_sum, _, _ = loss_from_logits(build_loss("discord"), x, batch, LossContext(), chunk_size=chunk)
        loss_sum.backward()
        torch.cuda.synchronize()
        assert x.grad is not None, chunk  # a missing gradient would also lower the peak
        grad_bytes = x.grad.numel() * x.grad.element_size()
        peaks[chunk] = torch.cuda.max_memory_allocated() - base - grad_bytes
        del x, loss_sum
    shard = logits.numel() * 4  # one fp32 copy
    assert peaks[1024] < 0.35 * peaks[None], peaks
    assert peaks[1024] < shard, (peaks, shard)


def test_every_loss_is_finite_on_cuda_bf16() -> None:
    logits, batch = _batch(2, 256, 8000, k=4, seed=1)
    for name in ("discord", "sft", "dft", "iw_sft", "kl", "todi"):
        x = logits.detach().requires_grad_(True)
        loss_sum, tokens, _ = loss_from_logits(build_loss(name), x, batch, LossContext())
        (loss_sum / tokens).backward()
        assert torch.isfinite(loss_sum) and x.grad is not None and torch.isfinite(x.grad.float()).all(), name


def _train(tmp: Path, name: str, *overrides: str) -> list[dict]:
    run_dir = tmp / name
    cmd = [sys.executable, "-m", "nemo_dcod.cli", "train", "--config", str(ROOT / "conf/train_tiny.yaml")]
    cmd += [
        f"run_dir={run_dir}",
        "trainer.devices=1",
        "parallel.tensor_model_parallel_size=1",
        "trainer.max_steps=10",
        "trainer.val_check_interval=0",
        "trainer.ckpt_every_n_steps=10",
        "model.spec=local",
        *overrides,
    ]
    subprocess.run(cmd, check=True, timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_training_bf16_close_to_fp32(tmp_path: Path) -> None:
    pytest.importorskip("nemo.collections.llm", reason="NeMo is not installed on this GPU machine")
    fp32 = _train(tmp_path, "fp32")
    bf16 = _train(tmp_path, "bf16", "precision.dtype=bf16")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in bf16)
    assert abs(bf16[0]["loss"] - fp32[0]["loss"]) < 2e-2 * abs(fp32[0]["loss"])
    assert abs(bf16[-1]["loss"] - fp32[-1]["loss"]) < 5e-2 * abs(fp32[-1]["loss"])


def test_tiny_training_fp8_close_to_bf16(tmp_path: Path) -> None:
    pytest.importorskip("nemo.collections.llm", reason="NeMo is not installed on this GPU machine")
    pytest.importorskip("transformer_engine", reason="FP8 needs Transformer Engine")
    bf16 = _train(tmp_path, "bf16", "precision.dtype=bf16", "model.spec=te")
    fp8 = _train(tmp_path, "fp8", "precision.dtype=bf16", "model.spec=te", "precision.fp8=hybrid")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in fp8)
    assert abs(fp8[-1]["loss"] - bf16[-1]["loss"]) < 5e-2 * abs(bf16[-1]["loss"])
