"""``nemo-dcod train`` gives the same losses and gradient norms at every parallel layout.

Run: ``.venv/bin/pytest tests/distributed/test_train_layouts.py -q -s`` (``-s`` prints the table of
differences). Each run is the real CLI in a subprocess (NeMo's ``MegatronStrategy``, Megatron's
schedules, DDP, Adam with clipping, gloo; ``trainer.devices=N`` makes Lightning re-launch it once
per rank), 3 optimizer steps of the tiny Llama 3.1 (4 layers, width 64) on fixed synthetic data
(``data.seed``), global batch 8, DisCorD with centring (``loss.center=true``, so both of its
data-parallel statistics, b and ḡ, are live). Per step, ``loss``, ``grad_norm`` and DisCorD's
``g_mean`` (ḡ) from ``metrics.jsonl`` must match the TP=1 / PP=1 / DP=1 reference to ``RTOL``.

**One initialisation for all.** Megatron's init RNG depends on the pipeline rank, so every run
starts from one checkpoint (``model.init_from``, weights only, resharded by distributed
checkpointing). That checkpoint is the *untrained* initialisation: it comes from a 1-step TP=1
run with ``optim.lr=1e-30``. Adam's first update is about lr (|m̂/√v̂| ≈ 1) and decoupled weight
decay lr·wd·|w|, far below half a float32 ulp of any non-zero weight, so the saved weights are the
initial ones bit for bit. :func:`test_init_checkpoint_is_the_untrained_initialisation` checks it:
that run's step-1 loss and gradient norm (on the initial weights) equal the reference's step 1.

**Layouts** (all with the same global batch of 8): TP=2, TP=2 with sequence parallelism, PP=2,
PP=2 with virtual PP=2 (interleaved schedule, one layer per chunk), TP=2 x PP=2 (4 processes) and
DP=2. TP and PP runs use micro-batch 2 like the reference (4 micro-batches of the same samples).

**DP=2 at micro-batch 1 and 2.** DisCorD's statistics are the previous step's, over its whole
global batch (``loss.stats=previous_step``, the default; :mod:`nemo_dcod.model.reduction`), so a
step's gradient does not depend on how its batch is split: DP=2 must match whichever samples share
a micro-batch. (With ``loss.stats=micro_batch`` DP=2 at micro-batch 2 groups samples {0..3},
{4..7} instead of the reference's pairs: its grad_norm differs by ~2e-3, relative.)

This test found two real bugs, both fixed where the model and the run are built: the interleaved
schedule's batched p2p exchange swapped activations and gradients at PP=2 (Megatron-LM issue #750;
``nemo_dcod/train/run.py`` now sets ``overlap_p2p_comm`` / ``batch_p2p_comm`` for virtual PP), and
on CPU Megatron freed pipeline outputs still being sent by gloo (``deallocate_pipeline_outputs``
off on CPU, ``nemo_dcod/model/families.py``). Sequence parallelism runs on CPU through CPU mode's
patch of megatron-core's ``WrappedTorchNorm`` (:mod:`nemo_dcod.parallel.cpu_mode`, patch 7).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nemo_dcod.train.checkpoints import newest_complete_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3
RTOL = 1e-5  # observed: bit-identical for PP and virtual PP, <= ~1e-6 relative for TP and DP
COMPARED = ("loss", "grad_norm", "g_mean")
COMMON = [
    "model.family=llama3.1",
    "model.size=tiny",
    "data.vocab_size=1000",
    "data.seq_length=32",
    "data.seed=7",
    "trainer.global_batch_size=8",
    "loss.name=discord",
    "loss.center=true",
]
RUN_TIMEOUT_S = 600


@dataclass(frozen=True)
class Layout:
    """A parallel layout: processes and the ``key=value`` overrides that set it."""

    name: str
    devices: int
    overrides: tuple[str, ...]


LAYOUTS = [
    Layout("tp2", 2, ("parallel.tensor_model_parallel_size=2", "trainer.micro_batch_size=2")),
    Layout(
        "tp2_sp",
        2,
        (
            "parallel.tensor_model_parallel_size=2",
            "parallel.sequence_parallel=true",
            "trainer.micro_batch_size=2",
        ),
    ),
    Layout("pp2", 2, ("parallel.pipeline_model_parallel_size=2", "trainer.micro_batch_size=2")),
    Layout(
        "pp2_vpp2",
        2,
        (
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
            "trainer.micro_batch_size=2",
        ),
    ),
    Layout(
        "tp2_pp2",
        4,
        (
            "parallel.tensor_model_parallel_size=2",
            "parallel.pipeline_model_parallel_size=2",
            "trainer.micro_batch_size=2",
        ),
    ),
    Layout("dp2", 2, ("trainer.micro_batch_size=1",)),
    Layout("dp2_mbs2", 2, ("trainer.micro_batch_size=2",)),  # another partition into micro-batches
]


def _train(run_dir: Path, devices: int, overrides: list[str]) -> list[dict[str, Any]]:
    """Run ``nemo-dcod train`` in a subprocess; its ``metrics.jsonl`` records, one per step."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"  # one thread per rank: 4 ranks on 2 cores, same numerics everywhere
    args = [f"run_dir={run_dir}", f"trainer.devices={devices}", *COMMON, *overrides]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_dcod.cli", "train", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=env,
        cwd=run_dir.parent,
        check=False,
    )
    (run_dir.parent / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    print(f"\n  {run_dir.name}: {devices} process(es), {time.perf_counter() - start:.0f} s", flush=True)
    assert proc.returncode == 0, (
        f"nemo-dcod train {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    )
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def init_run(workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The untrained initialisation as a checkpoint, and the step record of the run that saved it."""
    run_dir = workdir / "init"
    records = _train(
        run_dir,
        1,
        ["trainer.max_steps=1", "trainer.ckpt_every_n_steps=1", "optim.lr=1e-30", "optim.min_lr=0"],
    )
    checkpoint = newest_complete_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None, f"no complete checkpoint in {run_dir / 'checkpoints'}"
    return checkpoint, records[0]


def _from_init(init_checkpoint: Path) -> list[str]:
    return [
        f"model.init_from={init_checkpoint}",
        f"trainer.max_steps={STEPS}",
        f"trainer.ckpt_every_n_steps={10 * STEPS}",  # only the final save
    ]


@pytest.fixture(scope="module")
def reference(workdir: Path, init_run: tuple[Path, dict[str, Any]]) -> list[dict[str, Any]]:
    """TP=1 / PP=1 / DP=1, micro-batch 2 (4 micro-batches), from the shared initialisation."""
    records = _train(workdir / "reference", 1, [*_from_init(init_run[0]), "trainer.micro_batch_size=2"])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        assert all(math.isfinite(r[key]) for key in COMPARED), r
    # The run must move: equal numbers at every step would also match a layout that never trains.
    assert len({r["loss"] for r in records}) == STEPS
    return records


def test_init_checkpoint_is_the_untrained_initialisation(
    init_run: tuple[Path, dict[str, Any]], reference: list[dict[str, Any]]
) -> None:
    """Same layout, same data, same weights: the reference's step 1 equals the saving run's step 1."""
    _, first = init_run
    for key in COMPARED:
        assert reference[0][key] == pytest.approx(first[key], rel=1e-7, abs=0.0), key


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_layout_matches_reference(
    layout: Layout,
    workdir: Path,
    init_run: tuple[Path, dict[str, Any]],
    reference: list[dict[str, Any]],
) -> None:
    records = _train(workdir / layout.name, layout.devices, [*_from_init(init_run[0]), *layout.overrides])
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    report, mismatched = [], []
    for key in COMPARED:
        ours = [r[key] for r in records]
        ref = [r[key] for r in reference]
        abs_diff = max(abs(a - b) for a, b in zip(ours, ref, strict=True))
        rel_diff = max(abs(a - b) / abs(b) for a, b in zip(ours, ref, strict=True))
        report.append(f"{key} max abs {abs_diff:.2e} rel {rel_diff:.2e}")
        if ours != pytest.approx(ref, rel=RTOL, abs=0.0):
            mismatched.append(f"{key}: {ours} vs reference {ref}")
    print(f"  {layout.name}: " + "; ".join(report), flush=True)
    assert not mismatched, f"{layout.name} differs from TP=1/PP=1/DP=1 beyond rel {RTOL}: {mismatched}"
