"""A run that is killed, preempted or left with a damaged checkpoint ends where an uninterrupted one does.

Each scenario launches the real ``nemo-dcod train`` as a 2-process gloo job (Lightning starts rank
1 from rank 0) for 6 steps with a checkpoint every 2 steps and dropout on (``model.dropout=0.1``),
interrupts it, launches the same command again and compares the final checkpoint with an
uninterrupted run's of the same layout: every tensor of ``weights/`` bit for bit (the model and
Adam's two moments, read in this process with ``torch.distributed.checkpoint`` into full-size
tensors, so TP/PP shards are compared after being assembled), every rank's RNG states, the step
counters, LR-scheduler and data-sampler state (consumed samples) of ``common.pt``, and the per-step
losses in ``metrics.jsonl``. Bit equality is the right bar on CPU in fp32: the data of step ``i``
depends only on ``(seed, i)``, gloo's 2-rank collectives are deterministic, every process runs one
thread (``OMP_NUM_THREADS=1``), and the dropout masks come from the generators each rank saves in
its checkpoints (:mod:`nemo_dcod.train.rng_state`; without them a relaunch reseeds and draws other
masks).

Layouts: TP=2 on synthetic rows (the reference and the kill / damage / per-rank-view scenarios),
and DP=2 and PP=2 on a packed store made by ``prepare`` (SIGTERM and SIGUSR1 delivered to every
rank, as Slurm delivers them; the plain ``trainer.devices=2`` launch is not under Slurm).

Faults come in through ``run_train``'s hook parameter (``tests/helpers/faults.py`` is the entry point
that passes them), never through the environment: every rank SIGKILLed in the middle of a
checkpoint write (shard files written, no index yet), and rank 1 seeing a complete checkpoint as
incomplete.

NeMo names a checkpoint after the 0-based step being finished: ``step=3-consumed_samples=32.0``
holds the state after 4 optimizer steps (32 samples at global batch 8). The helpers below find
checkpoints by ``consumed_samples``.

Eleven launches of ~30-90 s each (three references, two interrupted runs, six relaunches); the
``checkpoint_problem`` cases reuse the reference's checkpoints and take milliseconds.

    .venv/bin/pytest tests/distributed/test_train_resume.py -q -x -s
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers.paths import ROOT
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from nemo_dcod.train.checkpoints import checkpoint_problem, newest_complete_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MAX_STEPS = 6
GLOBAL_BATCH = 8
COMMON_ARGS = [
    "trainer.devices=2",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.ckpt_every_n_steps=2",
    f"trainer.global_batch_size={GLOBAL_BATCH}",
    "trainer.micro_batch_size=2",
    "model.dropout=0.1",
]
TRAIN_ARGS = [*COMMON_ARGS, "parallel.tensor_model_parallel_size=2", "data.seq_length=32"]
STORE_SEQ, STORE_VOCAB = 64, 209
STORE_LAYOUTS = {"dp2": [], "pp2": ["parallel.pipeline_model_parallel_size=2"]}
RUN_TIMEOUT_S = 420.0
NEMO_DCOD = str(Path(sys.executable).with_name("nemo-dcod"))
FAULTS = ROOT / "tests" / "helpers" / "faults.py"


# --------------------------------------------------------------------------- launching and watching


class Launch:
    """One training job in its own process group; its output goes to ``<run_dir>.log<n>``.

    Args:
        run_dir: the run directory.
        args: ``key=value`` overrides after ``run_dir``.
        hooks: a ``TrainHooks`` expression: the job runs ``tests/helpers/faults.py train`` with it
            instead of ``nemo-dcod train``.
    """

    def __init__(self, run_dir: Path, args: list[str] = TRAIN_ARGS, hooks: str | None = None) -> None:
        self.run_dir = run_dir
        n = len(list(run_dir.parent.glob(f"{run_dir.name}.log*")))
        self.log_path = run_dir.parent / f"{run_dir.name}.log{n}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        command = [NEMO_DCOD, "train"] if hooks is None else [sys.executable, str(FAULTS), "train", hooks]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [*command, f"run_dir={run_dir}", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # rank 1 (Lightning's child) shares the group: killpg reaches it
            )
        self.start = time.monotonic()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fail(self, why: str) -> NoReturn:
        lines = [line for line in self.log.splitlines() if "RNG state changed within GPU RNG" not in line]
        tail = "\n".join(lines[-60:])
        pytest.fail(f"{why} (run {self.run_dir}, log {self.log_path}):\n{tail}")

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Poll ``condition`` every 20 ms; fail if the job ends or times out first."""
        while not condition():
            if self.proc.poll() is not None:
                self.fail(f"the job exited ({self.proc.returncode}) before {what}")
            if time.monotonic() - self.start > RUN_TIMEOUT_S:
                self.fail(f"timed out waiting for {what}")
            time.sleep(0.02)

    def wait(self) -> int:
        """Rank 0's exit status (the job killed and failed if it runs past the time limit)."""
        try:
            return self.proc.wait(timeout=max(RUN_TIMEOUT_S - (time.monotonic() - self.start), 1.0))
        except subprocess.TimeoutExpired:
            self.kill()
            self.fail("timed out")

    def finish(self) -> None:
        """Wait for the job; fail unless it exits 0."""
        rc = self.wait()
        if rc != 0:
            self.fail(f"exit status {rc}")

    def signal_every_rank(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every rank at once, as Slurm signals every task of a step."""
        os.killpg(self.proc.pid, sig)

    def kill(self) -> int:
        """SIGKILL the whole process group (both ranks, even if rank 0 is gone) and reap rank 0.

        Returns rank 0's exit status.
        """
        with contextlib.suppress(ProcessLookupError):  # the whole group has exited already
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=30)


@pytest.fixture
def launches() -> Iterator[list[Launch]]:
    """Jobs started by a test; whatever is still alive at its end is killed with its process group."""
    started: list[Launch] = []
    yield started
    for launch in started:
        launch.kill()


def _launch(
    launches: list[Launch], run_dir: Path, args: list[str] = TRAIN_ARGS, hooks: str | None = None
) -> Launch:
    launch = Launch(run_dir, args, hooks)
    launches.append(launch)
    return launch


def _uninterrupted(run_dir: Path, args: list[str]) -> dict[int, dict[str, Any]]:
    """Run a job to its end; its per-step metrics."""
    launch = Launch(run_dir, args)
    try:
        launch.finish()
    finally:
        launch.kill()
    metrics = _metrics(run_dir)
    assert sorted(metrics) == list(range(1, MAX_STEPS + 1))
    return metrics


# --------------------------------------------------------------------------- reading a run


def _samples(path: Path) -> int | None:
    match = re.search(r"consumed_samples=(\d+)", path.name)
    return int(match.group(1)) if match else None


def _checkpoint(run_dir: Path, steps: int, last: bool = False) -> Path:
    """The checkpoint folder holding the state after ``steps`` optimizer steps (or its ``-last`` copy)."""
    name = f"step={steps - 1}-consumed_samples={float(steps * GLOBAL_BATCH)}"
    return run_dir / "checkpoints" / (f"{name}-last" if last else name)


def _complete(path: Path) -> bool:
    return path.is_dir() and checkpoint_problem(path) is None


def _metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Step -> record of every ``metrics.jsonl`` in the run (NeMoLogger moves an earlier launch's
    top-level files to ``run_<n>/`` on relaunch); a later launch's record of a step wins."""
    files = sorted(run_dir.glob("run_*/metrics.jsonl"), key=lambda p: int(p.parent.name[4:]))
    files.append(run_dir / "metrics.jsonl")
    out: dict[int, dict[str, Any]] = {}
    for path in files:
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    out[record["step"]] = record
    return out


def _read(checkpoint: Path, kind: type) -> dict[str, Any]:
    """Every entry of ``<checkpoint>/weights`` of one storage kind, read in this process.

    The Megatron ``torch_dist`` format is a ``torch.distributed.checkpoint`` whose metadata gives
    each tensor's global shape; ``no_dist=True`` reads all shards into full-size tensors here.
    Byte entries are pickled objects: the layers' ``_extra_state`` and each rank's ``rng_state``.
    """
    reader = dcp.FileSystemReader(checkpoint / "weights")
    metadata = reader.read_metadata()
    state: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, kind) and isinstance(meta, TensorStorageMetadata):
            state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        elif isinstance(meta, kind):
            state[key] = io.BytesIO()
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (model and optimizer), assembled to full size."""
    return _read(checkpoint, TensorStorageMetadata)


def _rng_states(checkpoint: Path) -> dict[str, list[dict[str, Any]]]:
    """``rng_state/shard_<pp>.<tp>_<PP>.<TP>`` -> the generators of that place's data-parallel replicas."""
    # megatron-core stores a ShardedObject's data wrapped in a one-element list.
    return {k: v[0] for k, v in _read(checkpoint, BytesStorageMetadata).items() if k.startswith("rng_state/")}


def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested generator states (tuples, dicts, numpy arrays, tensors)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def _training_state(checkpoint: Path) -> dict[str, Any]:
    """Counters and schedules from ``common.pt`` that a resumed run must carry on exactly."""
    common = torch.load(checkpoint / "weights" / "common.pt", weights_only=False, map_location="cpu")
    optimizer = common["optimizer"][0]
    data = [value for key, value in common.items() if key.endswith("DataModule")]
    assert len(data) == 1 and "consumed_samples" in data[0], sorted(common)
    return {
        "global_step": common["global_step"],
        "adam_step": float(optimizer["state"]["common_step"]),
        "lr": [group["lr"] for group in optimizer["param_groups"]],
        "lr_scheduler": common["lr_schedulers"],
        "data": data[0],
    }


def _assert_same_final_state(run_dir: Path, reference: Path) -> None:
    """The newest complete checkpoint of ``run_dir`` equals the reference's final one, bit for bit."""
    final = newest_complete_checkpoint(run_dir / "checkpoints")
    assert final is not None and _samples(final) == MAX_STEPS * GLOBAL_BATCH, final
    expected_final = newest_complete_checkpoint(reference / "checkpoints")
    assert expected_final is not None
    got, expected = _tensors(final), _tensors(expected_final)
    assert sorted(got) == sorted(expected)
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in got)  # Adam's moments are compared too
    differ = {
        key: float((got[key].double() - expected[key].double()).abs().max())
        for key in expected
        if not torch.equal(got[key], expected[key])
    }
    assert not differ, f"tensors that differ from the uninterrupted run (max |diff|): {differ}"
    got_rng, expected_rng = _rng_states(final), _rng_states(expected_final)
    # One entry per (PP, TP) place, each with its data-parallel replicas' states: 2 ranks in all.
    assert sum(map(len, expected_rng.values())) == 2 and got_rng.keys() == expected_rng.keys(), (
        got_rng.keys(),
        expected_rng.keys(),
    )
    differ_rng = [key for key in expected_rng if not _same(got_rng[key], expected_rng[key])]
    assert not differ_rng, f"RNG states that differ from the uninterrupted run: {differ_rng}"
    state = _training_state(final)
    assert state == _training_state(expected_final)
    assert state["data"]["consumed_samples"] == MAX_STEPS * GLOBAL_BATCH


def _assert_same_losses(run_dir: Path, reference: dict[int, dict[str, Any]], steps: range) -> None:
    got = _metrics(run_dir)
    for step in steps:
        assert step in got, f"metrics.jsonl of {run_dir} has no step {step}"
        for key in ("loss", "lr", "grad_norm", "weight_sum", "delta_sum"):
            assert got[step][key] == reference[step][key], (step, key, got[step][key], reference[step][key])


def _steps_in(run_dir: Path, launch: Launch) -> list[int]:
    """The steps ``launch`` trained (its rank-0 progress lines), after checking that
    ``<run_dir>/metrics.jsonl`` holds every step of the run exactly once: the relaunch carries the
    records up to its checkpoint over from the file NeMoLogger moved to ``run_<n>/``."""
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, MAX_STEPS + 1)), steps
    return [int(m) for m in re.findall(r"^step (\d+)/\d+ \| loss", launch.log, flags=re.MULTILINE)]


def _restored_from(log: str) -> Path:
    match = re.search(r"Restored all states from the checkpoint at (\S+)/weights", log)
    assert match, "the relaunch did not restore a checkpoint:\n" + log[-4000:]
    return Path(match.group(1))


def _relaunch_matches(
    launches: list[Launch],
    run_dir: Path,
    reference: tuple[Path, dict[int, dict[str, Any]]],
    resumes_from: Path,
    args: list[str] = TRAIN_ARGS,
    hooks: str | None = None,
) -> Launch:
    """Relaunch ``run_dir``; it restores ``resumes_from``, trains only the steps after it and ends
    where ``reference`` ended. Returns the launch (its log) for further checks."""
    done = _training_state(resumes_from)["global_step"]  # read first: a -last folder goes at the next save
    launch = _launch(launches, run_dir, args, hooks)
    launch.finish()
    assert _restored_from(launch.log) == resumes_from
    assert _steps_in(run_dir, launch) == list(range(done + 1, MAX_STEPS + 1))
    _assert_same_losses(run_dir, reference[1], range(1, MAX_STEPS + 1))
    _assert_same_final_state(run_dir, reference[0])
    return launch


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, Any]]]:
    """The uninterrupted 6-step TP=2 run and its per-step metrics."""
    run_dir = tmp_path_factory.mktemp("resume") / "reference"
    metrics = _uninterrupted(run_dir, TRAIN_ARGS)
    # Warms up this process's unpickling of DCP metadata (imports megatron), so that the polls
    # below react within milliseconds.
    assert checkpoint_problem(_checkpoint(run_dir, MAX_STEPS)) is None
    return run_dir, metrics


KILL_IN_STEP_6 = "TrainHooks(callbacks=(KillMidCheckpointWrite(save=3),))"


@pytest.fixture(scope="module")
def killed_mid_write(
    reference: tuple[Path, dict[int, dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A run whose every rank is SIGKILLed in the middle of writing its 3rd checkpoint folder,
    step 6's (each step is saved once; ``*-last`` is a link to the step's folder), right after the
    rank's shard files are written: (run dir, a copy made before any relaunch).

    That folder is the one a resume would prefer (the newest step).
    """
    del reference  # only its order: the kill must not compete with the reference run for the cores
    base = tmp_path_factory.mktemp("killed")
    run_dir = base / "run"
    launch = Launch(run_dir, hooks=KILL_IN_STEP_6)
    try:
        rc = launch.wait()
    finally:
        launch.kill()
    assert rc == -signal.SIGKILL, (rc, launch.log[-3000:])  # killed, not finished
    assert launch.log.count("SIGKILLed mid checkpoint write") == 2, launch.log[-3000:]  # both ranks
    cut = _checkpoint(run_dir, 6)
    shards = sorted(p.name for p in (cut / "weights").glob("*.distcp"))
    assert shards and (cut / "weights" / "common.pt").is_file(), shards  # mid-write: data, no index
    assert not (cut / "weights" / ".metadata").exists() and not (cut / "weights" / "metadata.json").exists()
    assert _complete(_checkpoint(run_dir, 4)) and _complete(_checkpoint(run_dir, 2))
    assert _checkpoint(run_dir, 4, last=True).resolve() == _checkpoint(run_dir, 4)  # the link, not a copy
    shutil.copytree(run_dir, base / "pristine", symlinks=True)
    return run_dir, base / "pristine"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packed store made by the real ``prepare`` (40 traces with the engine's log-probs)."""
    import megatron.core.dist_checkpointing  # noqa: F401  # what the polls' unpickling imports
    from helpers.trace_fixtures import prepare_store

    # The import above warms up the polls of checkpoint_problem (the reference fixture does it
    # for the TP=2 scenarios): a first poll that imports megatron takes seconds, in which a run on
    # a quiet machine finishes all its steps.
    return Path(prepare_store(tmp_path_factory.mktemp("store"), STORE_SEQ, STORE_VOCAB))


def _store_args(store: Path, layout: str) -> list[str]:
    data = ["data.source=store", f"data.path={store}", f"data.vocab_size={STORE_VOCAB}"]
    return [*COMMON_ARGS, *data, f"data.seq_length={STORE_SEQ}", *STORE_LAYOUTS[layout]]


@pytest.fixture(scope="module")
def store_references(
    store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Path, dict[int, dict[str, Any]]]]:
    """``layout -> (run dir, metrics)`` of the uninterrupted store run of that layout, made once."""
    made: dict[str, tuple[Path, dict[int, dict[str, Any]]]] = {}

    def reference(layout: str) -> tuple[Path, dict[int, dict[str, Any]]]:
        if layout not in made:
            run_dir = tmp_path_factory.mktemp(f"store_reference_{layout}") / "reference"
            made[layout] = (run_dir, _uninterrupted(run_dir, _store_args(store, layout)))
        return made[layout]

    return reference


# --------------------------------------------------------------------------- the scenarios


def test_checkpoints_carry_every_ranks_generators(reference: tuple[Path, dict[int, dict[str, Any]]]) -> None:
    """Not vacuous: dropout draws from both generators, and the tracker's differ per TP rank."""
    early, late = (_rng_states(_checkpoint(reference[0], steps)) for steps in (4, 6))
    assert sorted(late) == ["rng_state/shard_0.0_1.2", "rng_state/shard_0.1_1.2"]  # (PP, TP) = (1, 2)
    tp0, tp1 = (late[k][0] for k in sorted(late))  # one data-parallel replica each
    assert not _same(tp0["tracker"], tp1["tracker"])  # seeded seed + 2718 + tp_rank
    for key in late:  # steps 5-6 drew hidden (torch) and attention (tracker) dropout masks
        for name in ("torch", "tracker"):
            assert not _same(early[key][0][name], late[key][0][name]), (key, name)


def test_sigkill_mid_checkpoint_write_then_relaunch_matches_uninterrupted_run(
    reference: tuple[Path, dict[int, dict[str, Any]]],
    killed_mid_write: tuple[Path, Path],
    launches: list[Launch],
) -> None:
    run_dir = killed_mid_write[0]
    _assert_same_losses(run_dir, reference[1], range(1, 5))  # the baseline itself is deterministic
    cut, step_4 = _checkpoint(run_dir, 6), _checkpoint(run_dir, 4)
    problem = checkpoint_problem(cut)
    assert problem is not None and problem.startswith("unfinished marker"), problem
    marker = cut.parent / f"{cut.name}-unfinished"
    aside = marker.rename(marker.with_name("aside"))
    try:  # without NeMo's marker, what the kill left out still tells: the context, and the index
        assert checkpoint_problem(cut) == "context/io.json missing"
        shutil.copytree(step_4 / "context", cut / "context")
        assert checkpoint_problem(cut) == "weights/metadata.json missing"  # and .metadata (the fixture)
    finally:
        shutil.rmtree(cut / "context", ignore_errors=True)
        aside.rename(marker)
    assert newest_complete_checkpoint(run_dir / "checkpoints") == step_4

    launch = _relaunch_matches(launches, run_dir, reference, resumes_from=step_4)
    assert f"warning: skipping incomplete checkpoint {cut}: {problem}" in launch.log
    # NeMo removed the folder cut off by the kill, and top-k bookkeeping carried on.
    assert not list((run_dir / "checkpoints").glob("*-unfinished"))
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (reference[0] / "checkpoints").iterdir()), names


def test_damaged_newest_checkpoint_is_skipped(
    reference: tuple[Path, dict[int, dict[str, Any]]],
    killed_mid_write: tuple[Path, Path],
    tmp_path: Path,
    launches: list[Launch],
) -> None:
    """Resume from step 2 when step 4 is damaged; the run dir is also a moved copy of the original."""
    run_dir = tmp_path / "run"
    shutil.copytree(killed_mid_write[1], run_dir, symlinks=True)
    step_4 = _checkpoint(run_dir, 4)
    assert _complete(step_4) and _complete(_checkpoint(run_dir, 2))
    # A writer killed mid-file: one shard cut short and no NeMo marker left behind (only the byte
    # ranges recorded in .metadata tell).
    shard = sorted((step_4 / "weights").glob("*.distcp"))[-1]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    expected_start = newest_complete_checkpoint(run_dir / "checkpoints")
    assert expected_start is not None and _samples(expected_start) == 2 * GLOBAL_BATCH, expected_start

    launch = _relaunch_matches(launches, run_dir, reference, resumes_from=expected_start)
    warning = f"warning: skipping incomplete checkpoint {step_4}: weights/{shard.name} truncated ("
    assert warning in launch.log, launch.log[-4000:]
    # Lightning does not write over the damaged folder: its version counter saves step 4 again
    # beside it (`...-v1`). The damaged one stays, outside top-k bookkeeping, and any later
    # relaunch skips it with the same warning.
    resaved = [p for p in step_4.parent.glob(f"{step_4.name}-v*") if _complete(p)]
    assert resaved, sorted(p.name for p in step_4.parent.iterdir())
    assert checkpoint_problem(step_4) is not None


def test_every_rank_resumes_from_rank_zeros_choice(
    reference: tuple[Path, dict[int, dict[str, Any]]],
    killed_mid_write: tuple[Path, Path],
    tmp_path: Path,
    launches: list[Launch],
) -> None:
    """Rank 1's view calls step 4 incomplete (a lagging file-system view): on its own it would
    restore step 2 while rank 0 restores step 4. It must take rank 0's choice."""
    run_dir = tmp_path / "run"
    shutil.copytree(killed_mid_write[1], run_dir, symlinks=True)
    step_4 = _checkpoint(run_dir, 4)
    hide = f"TrainHooks(checkpoint_problem=HideCheckpoint({step_4.name!r}, rank=1))"
    launch = _relaunch_matches(launches, run_dir, reference, resumes_from=step_4, hooks=hide)
    assert f"warning: skipping incomplete checkpoint {step_4}: hidden from rank 1 by the test" in launch.log
    switched = f"warning: rank 1 resumes from {step_4}, the choice of rank 0; its own check chose "
    own = re.search(re.escape(switched) + r"(\S+)", launch.log)
    assert own and _samples(Path(own.group(1))) == 2 * GLOBAL_BATCH, launch.log[-4000:]


def test_a_finished_run_extended_with_more_steps_validates_from_its_first_sample(
    reference: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path, launches: list[Launch]
) -> None:
    """The common "train N more steps" relaunch, with validation on: the validation sampler starts
    at its first sample, not at the training's resumed count (which, past the 16 validation
    samples, made NeMo's sampler refuse with "no samples left to consume: 48, 16")."""
    run_dir = tmp_path / "extended"
    shutil.copytree(reference[0], run_dir, symlinks=True)
    more = MAX_STEPS + 2
    args = [*TRAIN_ARGS, f"trainer.max_steps={more}", "trainer.val_check_interval=2"]
    launch = _launch(launches, run_dir, args)
    launch.finish()
    assert _restored_from(launch.log).name.startswith(f"step={MAX_STEPS - 1}-"), launch.log[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    trained = [r["step"] for r in records if "loss" in r]
    validated = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert trained == list(range(1, more + 1)), trained  # the reference's steps, then 7 and 8
    assert sorted(validated) == [more] and math.isfinite(validated[more]), validated
    state = _training_state(newest_complete_checkpoint(run_dir / "checkpoints"))
    assert state["global_step"] == more and state["data"]["consumed_samples"] == more * GLOBAL_BATCH


@pytest.mark.parametrize(
    ("layout", "sig"), [("dp2", signal.SIGTERM), ("pp2", signal.SIGUSR1)], ids=["dp2-sigterm", "pp2-sigusr1"]
)
def test_signal_to_every_rank_checkpoints_exits_0_and_relaunch_finishes(
    store: Path,
    store_references: Callable[[str], tuple[Path, dict[int, dict[str, Any]]]],
    layout: str,
    sig: signal.Signals,
    tmp_path: Path,
    launches: list[Launch],
) -> None:
    """From the packed store, at DP=2 (SIGTERM, as Slurm sends at preemption or the time limit)
    and PP=2 (SIGUSR1, ``--signal=USR1@...``, here outside Slurm), each against an uninterrupted
    run of its own layout."""
    args = _store_args(store, layout)
    reference = store_references(layout)
    run_dir = tmp_path / "run"
    launch = _launch(launches, run_dir, args)
    # Signalled once step 2's regular checkpoint is written: the stop comes at the end of step 3
    # (or later on a slow machine), so what the relaunch resumes from is the preemption save alone.
    launch.wait_until(lambda: _complete(_checkpoint(run_dir, 2)), "the step-2 checkpoint was complete")
    launch.signal_every_rank(sig)
    launch.finish()  # exit status 0
    assert "Preemption detected, saving checkpoint and exiting" in launch.log
    stopped_at = max(_metrics(run_dir))
    assert 3 <= stopped_at < MAX_STEPS, stopped_at
    # Every rank (rank 1 got the signal too) reached the barrier after the save and exited 0.
    exits = re.findall(
        rf"preempted: checkpoint saved at step {stopped_at}; exiting with status 0", launch.log
    )
    assert len(exits) == 2, launch.log[-4000:]
    saved = newest_complete_checkpoint(run_dir / "checkpoints")
    assert saved == _checkpoint(run_dir, stopped_at, last=True), saved
    assert _training_state(saved)["global_step"] == stopped_at
    assert _training_state(saved)["data"]["consumed_samples"] == stopped_at * GLOBAL_BATCH
    assert not list((run_dir / "checkpoints").glob("*-unfinished"))
    _relaunch_matches(launches, run_dir, reference, resumes_from=saved, args=args)


def test_sigkill_mid_epoch_on_shuffled_store_rows_resumes_bit_identical(
    store: Path,
    store_references: Callable[[str], tuple[Path, dict[int, dict[str, Any]]]],
    tmp_path: Path,
    launches: list[Launch],
) -> None:
    """DP=2 on the packed store with ``data.shuffle`` on (the default): every rank SIGKILLed once
    the step-2 checkpoint exists (16 samples: a third of the way into the second epoch of the
    store's 12 rows), then relaunched: it resumes mid-epoch in the same permutation and ends where
    the uninterrupted run ended (per-step losses, every tensor, RNG states, consumed samples)."""
    from nemo_dcod.data.store import PackedStore

    rows = len(PackedStore(store))
    assert (2 * GLOBAL_BATCH) % rows != 0, rows  # the checkpoint falls inside an epoch
    reference = store_references("dp2")
    run_dir = tmp_path / "run"
    launch = _launch(launches, run_dir, _store_args(store, "dp2"))
    launch.wait_until(lambda: _complete(_checkpoint(run_dir, 2)), "the step-2 checkpoint was complete")
    assert launch.kill() == -signal.SIGKILL  # nothing flushed, no preemption save
    saved = newest_complete_checkpoint(run_dir / "checkpoints")
    assert saved is not None and _training_state(saved)["global_step"] < MAX_STEPS, saved
    consumed = _training_state(saved)["data"]["consumed_samples"]
    assert consumed % rows != 0, consumed  # mid-epoch
    _relaunch_matches(launches, run_dir, reference, resumes_from=saved, args=_store_args(store, "dp2"))


# --------------------------------------------------------------------------- checkpoint_problem alone


def _damage_cases() -> list[tuple[str, Callable[[Path], None], str]]:
    def marker(c: Path) -> None:
        (c.parent / f"{c.name}-unfinished").touch()

    def truncate_shard(c: Path) -> None:
        shard = sorted((c / "weights").glob("*.distcp"))[0]
        with shard.open("r+b") as f:
            f.truncate(shard.stat().st_size - 1)

    def truncate_metadata(c: Path) -> None:
        path = c / "weights" / ".metadata"
        path.write_bytes(path.read_bytes()[:100])

    return [
        ("unfinished marker", marker, r"unfinished marker step=\S+-unfinished"),
        ("no io.json", lambda c: (c / "context" / "io.json").unlink(), r"context/io.json missing"),
        ("no .metadata", lambda c: (c / "weights" / ".metadata").unlink(), r"weights/\.metadata missing"),
        ("no metadata.json", lambda c: (c / "weights" / "metadata.json").unlink(), r"metadata\.json missing"),
        ("no common.pt", lambda c: (c / "weights" / "common.pt").unlink(), r"weights/common\.pt missing"),
        ("cut .metadata", truncate_metadata, r"weights/\.metadata unreadable \("),
        (
            "shard missing",
            lambda c: sorted((c / "weights").glob("*.distcp"))[1].unlink(),
            r"__\d_\d\.distcp missing",
        ),
        ("shard 1 byte short", truncate_shard, r"__0_0\.distcp truncated \(\d+ < \d+ bytes\)"),
    ]


@pytest.mark.parametrize("case", _damage_cases(), ids=lambda case: case[0])
def test_checkpoint_problem_names_the_damage(
    reference: tuple[Path, dict[int, dict[str, Any]]],
    tmp_path: Path,
    case: tuple[str, Callable[[Path], None], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, damage, pattern = case
    source = reference[0] / "checkpoints"
    directory = tmp_path / "checkpoints"
    older, newer = _checkpoint(reference[0], MAX_STEPS - 2), _checkpoint(reference[0], MAX_STEPS)
    for checkpoint in (older, newer):
        shutil.copytree(source / checkpoint.name, directory / checkpoint.name, symlinks=True)
    older, newer = directory / older.name, directory / newer.name
    assert checkpoint_problem(newer) is None
    damage(newer)
    problem = checkpoint_problem(newer)
    assert problem is not None and re.search(pattern, problem), problem
    assert newest_complete_checkpoint(directory) == older
    assert f"warning: skipping incomplete checkpoint {newer}: {problem}" in capsys.readouterr().out


def test_checkpoint_problem_reads_shard_ranges_from_metadata(
    reference: tuple[Path, dict[int, dict[str, Any]]],
) -> None:
    """The size check is not vacuous: .metadata points at every shard file, up to its last byte."""
    weights = _checkpoint(reference[0], MAX_STEPS) / "weights"
    with (weights / ".metadata").open("rb") as f:
        metadata = pickle.load(f)
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    shards = {p.name: p.stat().st_size for p in weights.glob("*.distcp")}
    assert len(shards) == 4  # 2 ranks x 2 writer threads
    assert ends == shards  # the last recorded byte range ends exactly at each file's end
    assert newest_complete_checkpoint(Path("/nonexistent")) is None
