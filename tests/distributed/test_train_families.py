"""Every student family trains through the plug-in: the tiny Qwen2.5 (QKV bias, tied embeddings)
and Qwen3 (QK-norm) configs from NeMo, as `nemo-dcod train` builds them, two steps at TP=2, with
the family's distinctive weights present in the saved checkpoint."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _checkpoint_keys(run_dir: Path) -> set[str]:
    (ckpt,) = [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith("-last")]
    with (ckpt / "weights" / ".metadata").open("rb") as f:
        return set(pickle.load(f).state_dict_metadata)


@pytest.mark.parametrize(
    ("family", "expected", "absent"),
    [
        ("qwen2.5", "module.decoder.layers.self_attention.linear_qkv.bias", "q_layernorm"),
        ("qwen3", "module.decoder.layers.self_attention.q_layernorm.weight", "linear_qkv.bias"),
    ],
)
def test_tiny_family_trains(tmp_path: Path, family: str, expected: str, absent: str) -> None:
    run_dir = tmp_path / family
    cmd = [sys.executable, "-m", "nemo_dcod.cli", "train", f"run_dir={run_dir}", f"model.family={family}"]
    cmd += ["trainer.devices=2", "parallel.tensor_model_parallel_size=2", "trainer.max_steps=2"]
    cmd += ["data.seq_length=32", "trainer.global_batch_size=4", "trainer.ckpt_every_n_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    estimate = "memory estimate per GPU (training, TP=2 PP=1 CP=1 DP=1)"  # printed once, not per rank
    assert proc.stdout.count(estimate) == 1, proc.stdout[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    keys = _checkpoint_keys(run_dir)
    assert expected in keys, sorted(keys)
    assert not any(absent in k for k in keys), sorted(keys)
