"""A store with a NaN teacher log-prob written into a shard after prepare reaches
`nemo-dcod train data.source=store` as an error naming the shard's column file, the row and the
position (raised by :class:`~nemo_dcod.data.store.PackedStore` when the row is read), never as a NaN
in the optimizer: the run exits 1 before any step is logged.

One CPU process (``trainer.devices=1``, TP=1), two steps of conf/train_store_tiny.yaml.

A NaN that reaches DisCorD's carried statistics (planted as a NaN Δ in step 3 through
``tests/helpers/faults.py``) stops the run in that step with the error naming the step and the
statistic, before the optimizer applies it: steps 1-2 are logged, step 3 never is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.paths import ROOT
from helpers.trace_fixtures import prepare_store

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _train(
    command: list[str], run_dir: Path, store: Path, extra: list[str]
) -> subprocess.CompletedProcess[str]:
    """One CPU process of ``command`` (train or faults.py train, with its config) on ``store``."""
    vocab = json.loads((store / "manifest.json").read_text())["vocab_size"]
    args = [f"run_dir={run_dir}", f"data.path={store}", f"data.vocab_size={vocab}", "trainer.devices=1"]
    return subprocess.run(
        [*command, *args, "parallel.tensor_model_parallel_size=1", *extra],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )


def test_nan_teacher_logprob_in_a_shard_stops_training_naming_shard_and_row(tmp_path: Path) -> None:
    store = Path(prepare_store(tmp_path, seq_length=128, vocab_size=209))
    shard = store / "shards" / "shard_00000"
    lps, mask = np.load(shard / "teacher_logprobs.npy"), np.load(shard / "loss_mask.npy")
    position = int(np.flatnonzero(mask[1])[3])  # a trained position of row 1: in the first batch
    lps[1, position] = np.nan
    np.save(shard / "teacher_logprobs.npy", lps)
    run_dir = tmp_path / "run"
    proc = _train(
        [sys.executable, "-m", "nemo_dcod.cli", "train", "--config", "conf/train_store_tiny.yaml"],
        run_dir,
        store,
        ["trainer.max_steps=2", "optim.warmup_steps=1", "trainer.val_check_interval=2"],
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-4000:])
    expected = (
        f"nemo-dcod train: {shard}/teacher_logprobs.npy: row 1 (store row 1), position {position}: "
        "nan at a trained position"
    )
    assert expected in proc.stderr, proc.stderr[-4000:]
    metrics = run_dir / "metrics.jsonl"
    logged = metrics.read_text().splitlines() if metrics.exists() else []
    assert not [line for line in logged if '"loss"' in line], logged  # no step ran on the NaN


def test_nan_in_carried_statistics_stops_the_run_before_the_optimizer_step(tmp_path: Path) -> None:
    store = Path(prepare_store(tmp_path, seq_length=128, vocab_size=209))
    run_dir = tmp_path / "run"
    faults = [sys.executable, str(ROOT / "tests" / "helpers" / "faults.py"), "train"]
    hooks = "TrainHooks(callbacks=(PlantNonFiniteDelta(step=3),))"
    proc = _train(
        [*faults, hooks, "--config=conf/train_store_tiny.yaml"],
        run_dir,
        store,
        ["trainer.max_steps=5", "trainer.ckpt_every_n_steps=100", "optim.warmup_steps=1", "loss.center=true"],
    )
    assert proc.returncode != 0, proc.stderr[-4000:]
    assert "NaN Δ planted in step 3" in proc.stderr, proc.stderr[-4000:]
    assert "NonFiniteStatsError: DisCorD's carried statistic b (mean Δ) = nan measured on step 2's batch" in (
        proc.stderr
    ), proc.stderr[-4000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2], steps  # step 3 was never applied nor logged
