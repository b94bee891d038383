"""bench/train_gpu.py can't rot: its figures from hand-checked inputs, its no-GPU exit, a smoke run."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.paths import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import train_gpu

from nemo_dcod.train.memory import Architecture

RESULT = re.compile(
    r"^RESULT gpu=(\S+) tokens_per_s_gpu=\d+ mfu=(\S+) discord_over_sft=(\d+\.\d{3}) mem_over_estimate=(\S+)$"
)


def llama32_1b(tied: bool = True) -> Architecture:
    return Architecture(
        num_layers=16,
        hidden_size=2048,
        ffn_hidden_size=8192,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=64,
        padded_vocab_size=128256,
        share_embeddings_and_output_weights=tied,
    )


def test_peak_table_picks_the_specific_card_first() -> None:
    assert train_gpu.peak_bf16_flops("NVIDIA H200") == 989e12
    assert train_gpu.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert train_gpu.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert train_gpu.peak_bf16_flops("NVIDIA GH200 480GB") == 989e12
    assert train_gpu.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert train_gpu.peak_bf16_flops("NVIDIA L40S") == 362e12
    assert train_gpu.peak_bf16_flops("Some GPU") is None


def test_model_flops_of_llama32_1b() -> None:
    """N by hand: per layer QKV 2048·(32+2·8)·64 + projection 2048² + SwiGLU 3·2048·8192 + two
    norms; the final norm; the (tied) output layer 128256·2048 once."""
    layer = 2048 * 48 * 64 + 2048 * 2048 + 3 * 2048 * 8192 + 2 * 2048
    n = 16 * layer + 2048 + 128256 * 2048
    assert train_gpu.matmul_parameters(llama32_1b()) == n == llama32_1b().total_parameters()
    assert 1.23e9 < n < 1.24e9  # Llama-3.2-1B's published 1.24B
    # Untied: the input embedding is a lookup, not counted.
    untied = llama32_1b(tied=False)
    assert train_gpu.matmul_parameters(untied) == untied.total_parameters() - 128256 * 2048 == n
    assert train_gpu.model_flops_per_token(n, 16, 2048, 4096) == 6 * n + 12 * 16 * 2048 * 4096


def _records(sft: float, discord: float, steps: int = 12) -> list[dict[str, float]]:
    out = []
    for step in range(1, steps + 1):
        name = train_gpu.loss_of_step(step - 1)
        out.append(
            {
                "step": step,
                "tokens_per_s": sft if name == "sft" else discord,
                train_gpu.MARKER: float(name == "discord"),
            }
        )
    return out


def test_summarize_and_report() -> None:
    stats = {
        "device": "NVIDIA H200",
        "peak_allocated": 60 * 2**30,
        "estimate": 50 * 2**30,
        "estimate_text": "memory estimate ...",
        "matmul_params": 10**9,
        "num_layers": 16,
        "hidden_size": 2048,
        "seq_length": 4096,
        "tokens_per_step": 4 * 4096,
    }
    records = _records(1000.0, 990.0)
    records[0]["tokens_per_s"] = 1.0  # the warm-up block is not counted
    figures = train_gpu.summarize(records, stats)
    assert figures["discord_over_sft"] == pytest.approx(0.99)
    assert figures["mem_over_estimate"] == pytest.approx(1.2)
    flops = 6e9 + 12 * 16 * 2048 * 4096
    assert figures["mfu"] == pytest.approx(figures["tokens_per_s_gpu"] * flops / 989e12)
    line = train_gpu.report(figures, stats, smoke=False)
    match = RESULT.match(line)
    assert match and match.group(1) == "H200" and match.group(3) == "0.990", line
    bad = _records(1000.0, 990.0)
    bad[5][train_gpu.MARKER] = 1.0 - bad[5][train_gpu.MARKER]
    with pytest.raises(RuntimeError, match="step 6: expected"):
        train_gpu.summarize(bad, stats)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit without a GPU")
def test_without_a_gpu_it_skips_cleanly() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench/train_gpu.py"), "--store", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert run.returncode == 0, run.stderr
    assert "skipped: no GPU" in run.stdout and "RESULT" not in run.stdout


@pytest.mark.slow
def test_smoke_run_prints_a_cpu_result(tmp_path: Path) -> None:
    """A real NeMo training run (tiny model, 8 steps, fp32) through the benchmark's ABBA loss switch."""
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench/train_gpu.py"), "--smoke", "--keep", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    match = RESULT.match(run.stdout.strip().splitlines()[-1])
    assert match and match.group(1) == "cpu-smoke", run.stdout[-2000:]
    assert math.isnan(float(match.group(2))) and float(match.group(3)) > 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 8
