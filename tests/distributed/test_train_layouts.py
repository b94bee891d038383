"""``nemo-dcod train`` gives the same gradient of every parameter, and the same losses, at every layout.

Run: ``.venv/bin/pytest tests/distributed/test_train_layouts.py -q -x -s`` (``-s`` prints the table
of worst differences). Each run is the real CLI in a subprocess (NeMo's ``MegatronStrategy``,
Megatron's schedules, DDP, Adam with clipping, gloo; ``trainer.devices=N`` makes Lightning re-launch
it once per rank), 3 optimizer steps of the tiny Llama 3.1 (4 layers, width 64) on a real packed
store made by ``prepare`` in the test (12 rows of 64 tokens holding 1 to 5 documents each:
block-diagonal causal masks, positions restarting per document), global batch 8, DisCorD with
centring (``loss.center=true``: both of its global statistics, b and ḡ, are live; with the default
``loss.stats=previous_step`` step 1 trains with λ = 0, steps 2 and 3 with λ = 1 on the previous
step's statistics), rows in the default shuffled order (``data.shuffle``). Every rank runs with
:class:`helpers.grad_probe.RecordGradients` (``tests/helpers/grad_probe.py``, the entry point that
passes ``run_train`` that hook) and writes,
per step, the gradient of each of its parameters as Megatron's optimizer receives it: after
``finalize_model_grads`` (all-reduced over data-parallel ranks, sequence-parallel norm weights over
TP, divided by the global token count) and **before clipping** (``clip_grad=1.0``; the step norms
are ~1.8-2.2, so clipping acts on every step).

**What must match the TP=1 / PP=1 / DP=1 reference**, per step:

* each parameter's gradient, reassembled to the full tensor (TP shards concatenated along
  ``partition_dim``, the SwiGLU ``linear_fc1`` as [every rank's gate; every rank's up], PP stages and
  virtual-PP chunks merged under global layer numbers, the embedding from the first stage and the
  output layer from the last): ``max |g - g_ref| <= GRAD_RTOL x max |g_ref|`` for each tensor;
* ``loss``, ``grad_norm`` and DisCorD's ``g_mean`` from ``metrics.jsonl`` to ``RTOL``;
* within each run: the norm of the reassembled gradient is the logged ``grad_norm`` (nothing
  missing or counted twice, and it is the unclipped gradient), and every copy of a gradient
  (data-parallel replicas, TP replicas of norm weights) is the same to ``GRAD_RTOL``;
* **the data**: in every step each data-parallel rank reads the samples of Megatron's fixed split
  of the global batch (micro-batch ``k`` of DP rank ``r`` at micro-batch size ``m`` holds samples
  ``k·m·DP + r·m + [0, m)`` of the step's 8), so the DP ranks' samples are disjoint and together
  the reference's, and every rank of one DP rank's TP x PP group reads the same; and each sample
  index serves the same store row as in the reference (the seeded permutation is the same for
  every layout), not the store's order.

**Tolerances and what was observed** (fp32 on 2 CPU cores, one thread per rank): ``GRAD_RTOL`` =
2e-5 and ``RTOL`` = 1e-5. Worst per-parameter differences seen (relative to each tensor's largest
magnitude, over 3 steps; 2026-12-04): TP=2, TP=2 + SP, TP=2 x PP=2, DP=2 x TP=2 3.0e-6; PP=2 and
PP=2 + vPP=2 1.1e-6; DP=2 (micro-batch 1 or 2) and DP=2 x PP=2 <= 9.3e-7; losses <= 9.2e-8 and
grad norms <= 2.2e-7 relative. Step 1 is <= 4e-7 everywhere; steps 2-3 are larger because Adam's
first update ``m̂/(√v̂+ε)`` is about ``sign(g)``: elements whose gradient is near 0 amplify a ~1e-7
relative difference.

**One initialisation for all.** Megatron's init RNG depends on the pipeline rank, so every run
starts from one checkpoint (``model.init_from``, weights only, resharded by distributed
checkpointing). That checkpoint is the *untrained* initialisation: it comes from a 1-step TP=1
run with ``optim.lr=1e-30``. Adam's first update is about lr (|m̂/√v̂| ≈ 1) and decoupled weight
decay lr·wd·|w|, far below half a float32 ulp of any non-zero weight, so the saved weights are the
initial ones bit for bit. :func:`test_init_checkpoint_is_the_untrained_initialisation` checks it:
that run's step-1 loss, gradient norm and gradients (on the initial weights) equal the reference's.

**Layouts** (all with global batch 8; the reference at micro-batch 1, i.e. 8 micro-batches): TP=2,
TP=2 with sequence parallelism, PP=2, PP=2 with virtual PP=2 (interleaved schedule, one layer per
chunk), TP=2 x PP=2, DP=2 at micro-batch 1 and 2, DP=2 x TP=2 (micro-batch 2) and DP=2 x PP=2
(micro-batch 1). With ``previous_step`` statistics a step's gradient does not depend on how its
batch is split into micro-batches and data-parallel ranks, so every layout splits it differently
from the reference: each test fails when the statistics are per micro-batch. Set
``DCOD_LAYOUTS_LOSS_STATS=micro_batch`` (read only by this module) to run the whole file with
``loss.stats=micro_batch``: the layout tests then fail (run 2026-12-04 for TP=2 + SP, PP=2 + vPP=2,
DP=2 at micro-batch 2, DP=2 x TP=2, DP=2 x PP=2: 81 of 81 gradient tensors beyond ``GRAD_RTOL``,
worst 9.2e-3 to 1.9e-2, already 3.9e-3 to 5.3e-3 at step 1; grad norms 1.4e-4 to 1.5e-3 apart).

This test found two real bugs, both fixed where the model and the run are built: the interleaved
schedule's batched p2p exchange swapped activations and gradients at PP=2 (Megatron-LM issue #750;
``nemo_dcod/train/run.py`` now sets ``overlap_p2p_comm`` / ``batch_p2p_comm`` for virtual PP), and
on CPU Megatron freed pipeline outputs still being sent by gloo (``deallocate_pipeline_outputs``
off on CPU, ``nemo_dcod/model/families.py``). Sequence parallelism runs on CPU through CPU mode's
patch of megatron-core's ``WrappedTorchNorm`` (:mod:`nemo_dcod.parallel.cpu_mode`, patch 7).

Time: 11 launches (about 15 s for one process, 30 s for two, 60-80 s for four) on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers.grad_probe import StepGradients, read_step
from helpers.paths import ROOT

from nemo_dcod.train.checkpoints import newest_complete_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3
GLOBAL_BATCH = 8
RTOL = 1e-5  # loss, grad_norm, g_mean
GRAD_RTOL = 2e-5  # each parameter's gradient, relative to its largest magnitude
COMPARED = ("loss", "grad_norm", "g_mean")
STORE_SEQ, STORE_VOCAB = 64, 209
STATS = os.environ.get("DCOD_LAYOUTS_LOSS_STATS", "previous_step")  # micro_batch: must fail
COMMON = [
    "model.family=llama3.1",
    "model.size=tiny",
    "data.source=store",
    f"data.vocab_size={STORE_VOCAB}",
    f"data.seq_length={STORE_SEQ}",
    f"trainer.global_batch_size={GLOBAL_BATCH}",
    "loss.name=discord",
    "loss.center=true",
    f"loss.stats={STATS}",
]
RUN_TIMEOUT_S = 600
PROBE = ROOT / "tests" / "helpers" / "grad_probe.py"


@dataclass(frozen=True)
class Layout:
    """A parallel layout: processes, micro-batch size and the ``key=value`` overrides that set it."""

    name: str
    devices: int
    micro_batch: int
    overrides: tuple[str, ...] = ()


TP2, PP2 = "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"
LAYOUTS = [
    Layout("tp2", 2, 2, (TP2,)),
    Layout("tp2_sp", 2, 2, (TP2, "parallel.sequence_parallel=true")),
    Layout("pp2", 2, 2, (PP2,)),
    Layout("pp2_vpp2", 2, 2, (PP2, "parallel.virtual_pipeline_model_parallel_size=2")),
    Layout("tp2_pp2", 4, 2, (TP2, PP2)),
    Layout("dp2", 2, 1),
    Layout("dp2_mbs2", 2, 2),  # another partition into micro-batches
    Layout("dp2_tp2", 4, 2, (TP2,)),
    Layout("dp2_pp2", 4, 1, (PP2,)),
]


@dataclass
class Run:
    """A finished run: its ``metrics.jsonl`` records (one per step) and its gradients per step."""

    records: list[dict[str, Any]]
    steps: list[StepGradients]


def _train(run_dir: Path, devices: int, steps: int, overrides: list[str]) -> Run:
    """Run ``nemo-dcod train`` with the gradient probe in a subprocess; read what it wrote."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"  # one thread per rank: 4 ranks on 2 cores, same numerics everywhere
    grads = run_dir.parent / f"{run_dir.name}.grads"
    args = [f"run_dir={run_dir}", f"trainer.devices={devices}", *COMMON, *overrides]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(PROBE), str(grads), str(steps), *args],
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
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    return Run(records, [read_step(grads, step) for step in range(1, steps + 1)])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def store(workdir: Path) -> Path:
    """A packed store made by the real ``prepare`` (40 traces with the engine's log-probs)."""
    from helpers.trace_fixtures import prepare_store

    from nemo_dcod.data.store import PackedStore

    path = Path(prepare_store(workdir / "data", STORE_SEQ, STORE_VOCAB))
    rows = PackedStore(path)
    documents = [int(rows[i]["segment_ids"].max()) + 1 for i in range(len(rows))]
    # Several documents per row: the block-diagonal masks are live in most rows.
    assert sum(n >= 2 for n in documents) >= len(rows) // 2 and max(documents) >= 3, documents
    return path


@pytest.fixture(scope="module")
def init_run(workdir: Path, store: Path) -> tuple[Path, Run]:
    """The untrained initialisation as a checkpoint, and the run that saved it."""
    run_dir = workdir / "init"
    overrides = ["trainer.max_steps=1", "trainer.ckpt_every_n_steps=1", "optim.lr=1e-30", "optim.min_lr=0"]
    run = _train(run_dir, 1, 1, [f"data.path={store}", "trainer.micro_batch_size=1", *overrides])
    checkpoint = newest_complete_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None, f"no complete checkpoint in {run_dir / 'checkpoints'}"
    return checkpoint, run


def _from_init(init_checkpoint: Path, store: Path, micro_batch: int) -> list[str]:
    return [
        f"data.path={store}",
        f"model.init_from={init_checkpoint}",
        f"trainer.max_steps={STEPS}",
        f"trainer.ckpt_every_n_steps={10 * STEPS}",  # only the final save
        f"trainer.micro_batch_size={micro_batch}",
    ]


def _expected_samples(step: int, dp_rank: int, dp_size: int, micro_batch: int) -> list[int]:
    """Megatron's fixed split: the samples DP rank ``dp_rank`` reads in ``step`` (1-based)."""
    base, per_micro = (step - 1) * GLOBAL_BATCH, micro_batch * dp_size
    return [
        base + k * per_micro + dp_rank * micro_batch + j
        for k in range(GLOBAL_BATCH // per_micro)
        for j in range(micro_batch)
    ]


def _check_run(run: Run, dp_size: int, micro_batch: int) -> float:
    """A run's own consistency (see the module docstring); returns its worst replica difference."""
    for step, (record, grads) in enumerate(zip(run.records, run.steps, strict=True), start=1):
        assert sorted(grads.samples) == list(range(dp_size)), grads.samples
        for dp_rank, samples in grads.samples.items():
            assert samples == _expected_samples(step, dp_rank, dp_size, micro_batch), (step, dp_rank, samples)
        union = sorted(i for samples in grads.samples.values() for i in samples)
        assert union == list(range((step - 1) * GLOBAL_BATCH, step * GLOBAL_BATCH)), (step, grads.samples)
        norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.full.values()))
        assert norm == pytest.approx(record["grad_norm"], rel=RTOL), (step, norm, record["grad_norm"])
        assert grads.replica_diff <= GRAD_RTOL, (step, grads.replica_diff)
    return max(g.replica_diff for g in run.steps)


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, workdir: Path, store: Path, init_run: tuple[Path, Run]
) -> Iterator[dict[str, Future[Run]]]:
    """The reference and every selected layout, two launches at a time, from the shared init.

    A launch keeps about one core busy (a rank's imports, then rank 0 waiting for the ranks
    Lightning starts), so two at a time fill the 2 cores; each process runs one thread and gloo's
    collectives are deterministic, so the numbers do not depend on what runs beside it.
    """
    # This module's selected layouts only: other modules' tests may have a `layout` parameter too.
    selected = {
        item.callspec.params["layout"].name
        for item in request.session.items
        if hasattr(item, "callspec") and isinstance(item.callspec.params.get("layout"), Layout)
    }
    jobs = [("reference", 1, 1, ()), *((x.name, x.devices, x.micro_batch, x.overrides) for x in LAYOUTS)]
    jobs = [job for job in jobs if job[0] == "reference" or job[0] in selected]
    # The reference first (every test needs it), then the 4-process launches beside 2-process ones.
    jobs.sort(key=lambda job: -9 if job[0] == "reference" else -job[1])
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {
        name: pool.submit(
            _train, workdir / name, devices, STEPS, [*_from_init(init_run[0], store, micro), *overrides]
        )
        for name, devices, micro, overrides in jobs
    }
    yield futures
    pool.shutdown(cancel_futures=True)  # after a failure (-x): wait only for the running ones


@pytest.fixture(scope="module")
def reference(runs: dict[str, Future[Run]]) -> Run:
    """TP=1 / PP=1 / DP=1, micro-batch 1 (8 micro-batches), from the shared initialisation."""
    run = runs["reference"].result()
    _check_run(run, 1, 1)
    for r in run.records:
        assert all(math.isfinite(r[key]) for key in COMPARED), r
    # The run must move: equal numbers at every step would also match a layout that never trains.
    assert len({r["loss"] for r in run.records}) == STEPS
    # Steps 2 and 3 train with DisCorD's weights: two of the three compared steps can catch a bug
    # in them (with centring, b and ḡ of the previous step).
    assert [r["lambda"] for r in run.records] == [0.0, 1.0, 1.0], [r["lambda"] for r in run.records]
    first = [run.steps[0].rows[i] for i in range(GLOBAL_BATCH)]
    assert first != list(range(GLOBAL_BATCH)) and None not in first, first  # shuffled, not store order
    return run


def _grad_differences(run: Run, reference: Run) -> list[tuple[float, int, str]]:
    """``(relative difference, step, parameter)`` of every parameter and step, worst first."""
    out = []
    for step, (ours, ref) in enumerate(zip(run.steps, reference.steps, strict=True), start=1):
        assert ours.full.keys() == ref.full.keys(), set(ours.full) ^ set(ref.full)
        for name, expected in ref.full.items():
            got = ours.full[name]
            assert got.shape == expected.shape, (step, name, got.shape, expected.shape)
            scale = float(expected.abs().max())
            assert scale > 0, f"step {step}: {name} has an all-zero reference gradient"
            out.append((float((got - expected).abs().max()) / scale, step, name))
    return sorted(out, reverse=True)


def test_init_checkpoint_is_the_untrained_initialisation(init_run: tuple[Path, Run], reference: Run) -> None:
    """Same layout, same data, same weights: the reference's step 1 equals the saving run's step 1."""
    _, first = init_run
    for key in COMPARED:
        assert reference.records[0][key] == pytest.approx(first.records[0][key], rel=1e-7, abs=0.0), key
    worst, _, name = _grad_differences(first, Run(reference.records[:1], reference.steps[:1]))[0]
    assert worst <= 1e-7, (name, worst)


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_layout_matches_reference(layout: Layout, runs: dict[str, Future[Run]], reference: Run) -> None:
    run = runs[layout.name].result()
    dp_size = layout.devices // (2 ** sum(o in (TP2, PP2) for o in layout.overrides))
    replicas = _check_run(run, dp_size, layout.micro_batch)
    for step, (ours, ref) in enumerate(zip(run.steps, reference.steps, strict=True), start=1):
        assert ours.rows == ref.rows, f"step {step}: store rows {ours.rows} vs the reference's {ref.rows}"
    differences = _grad_differences(run, reference)
    report, mismatched = [], []
    for key in COMPARED:
        ours = [r[key] for r in run.records]
        ref = [r[key] for r in reference.records]
        rel_diff = max(abs(a - b) / abs(b) for a, b in zip(ours, ref, strict=True))
        report.append(f"{key} rel {rel_diff:.1e}")
        if ours != pytest.approx(ref, rel=RTOL, abs=0.0):
            mismatched.append(f"{key}: {ours} vs reference {ref}")
    worst, step, name = differences[0]
    by_step = [max(d for d, s, _ in differences if s == k) for k in range(1, STEPS + 1)]
    print(
        f"  {layout.name}: grads worst {worst:.1e} (step {step}, {name}); per step "
        + " ".join(f"{d:.1e}" for d in by_step)
        + f"; replicas {replicas:.1e}; "
        + "; ".join(report),
        flush=True,
    )
    beyond = [f"step {s} {n}: {d:.2e}" for d, s, n in differences if d > GRAD_RTOL]
    assert not beyond, f"{layout.name}: {len(beyond)} gradients differ beyond {GRAD_RTOL}: {beyond[:8]}"
    assert not mismatched, f"{layout.name} differs from TP=1/PP=1/DP=1 beyond rel {RTOL}: {mismatched}"
