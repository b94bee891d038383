"""A run that is killed, preempted or left with a damaged checkpoint ends where an uninterrupted one does.

Each scenario launches the real ``nemo-dcod train`` as a 2-process gloo job (TP=2, Lightning starts
rank 1 from rank 0) for 6 steps with a checkpoint every 2 steps, interrupts it, launches the same
command again and compares the final checkpoint with an uninterrupted run's (one module fixture):
every tensor of ``weights/`` bit for bit (the model and Adam's two moments, read in this process
with ``torch.distributed.checkpoint`` into full-size tensors, so the TP shards are compared after
being assembled), the step counters, LR-scheduler and data-sampler state of ``common.pt``, and the
per-step losses in ``metrics.jsonl``. Bit equality is the right bar on CPU in fp32: the data of
step ``i`` depends only on ``(seed, i)``, gloo's 2-rank all-reduce is deterministic, every process
runs one thread (``OMP_NUM_THREADS=1``), and the model has no dropout. (NeMo 2 checkpoints no RNG
state: a relaunch reseeds from ``seed``, so with dropout a resumed run would draw other masks.)

NeMo names a checkpoint after the 0-based step being finished: ``step=3-consumed_samples=32.0``
holds the state after 4 optimizer steps (32 samples at global batch 8). The helpers below find
checkpoints by ``consumed_samples``.

Six launches of ~40-75 s each (the reference, two interrupted runs, three relaunches); the
``checkpoint_problem`` cases reuse the reference's checkpoints and take milliseconds.

    .venv/bin/pytest tests/distributed/test_train_resume.py -q -x -s   # ~7 min on 2 busy CPU cores
"""

from __future__ import annotations

import contextlib
import json
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
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from nemo_dcod.train.checkpoints import checkpoint_problem, newest_complete_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MAX_STEPS = 6
GLOBAL_BATCH = 8
TRAIN_ARGS = [
    "trainer.devices=2",
    "parallel.tensor_model_parallel_size=2",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.ckpt_every_n_steps=2",
    f"trainer.global_batch_size={GLOBAL_BATCH}",
    "trainer.micro_batch_size=2",
    "data.seq_length=32",
]
RUN_TIMEOUT_S = 300.0
NEMO_DCOD = str(Path(sys.executable).with_name("nemo-dcod"))


# --------------------------------------------------------------------------- launching and watching


class Launch:
    """One ``nemo-dcod train`` job in its own process group; its output goes to ``<run_dir>.log<n>``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        n = len(list(run_dir.parent.glob(f"{run_dir.name}.log*")))
        self.log_path = run_dir.parent / f"{run_dir.name}.log{n}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [NEMO_DCOD, "train", f"run_dir={run_dir}", *TRAIN_ARGS],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # rank 1 (Lightning's child) shares the group: killpg reaches it
            )
        self.start = time.monotonic()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fail(self, why: str) -> None:
        tail = "\n".join(self.log.splitlines()[-60:])
        pytest.fail(f"{why} (run {self.run_dir}, log {self.log_path}):\n{tail}")

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Poll ``condition`` every 20 ms; fail if the job ends or times out first."""
        while not condition():
            if self.proc.poll() is not None:
                self.fail(f"the job exited ({self.proc.returncode}) before {what}")
            if time.monotonic() - self.start > RUN_TIMEOUT_S:
                self.fail(f"timed out waiting for {what}")
            time.sleep(0.02)

    def finish(self) -> None:
        """Wait for the job; fail unless it exits 0."""
        try:
            rc = self.proc.wait(timeout=max(RUN_TIMEOUT_S - (time.monotonic() - self.start), 1.0))
        except subprocess.TimeoutExpired:
            self.kill()
            self.fail("timed out")
        if rc != 0:
            self.fail(f"exit status {rc}")

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


def _launch(launches: list[Launch], run_dir: Path) -> Launch:
    launch = Launch(run_dir)
    launches.append(launch)
    return launch


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


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``<checkpoint>/weights`` (model and optimizer), assembled to full size here.

    The Megatron ``torch_dist`` format is a ``torch.distributed.checkpoint`` whose metadata gives
    each tensor's global shape; ``no_dist=True`` reads all shards in this single process. Entries
    stored as bytes (the layers' ``_extra_state``) are left out.
    """
    reader = dcp.FileSystemReader(checkpoint / "weights")
    metadata = reader.read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def _training_state(checkpoint: Path) -> dict[str, Any]:
    """Counters and schedules from ``common.pt`` that a resumed run must carry on exactly."""
    common = torch.load(checkpoint / "weights" / "common.pt", weights_only=False, map_location="cpu")
    optimizer = common["optimizer"][0]
    return {
        "global_step": common["global_step"],
        "adam_step": float(optimizer["state"]["common_step"]),
        "lr": [group["lr"] for group in optimizer["param_groups"]],
        "lr_scheduler": common["lr_schedulers"],
        "data": common["SyntheticTraceDataModule"],
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
    assert _training_state(final) == _training_state(expected_final)


def _assert_same_losses(run_dir: Path, reference: dict[int, dict[str, Any]], steps: range) -> None:
    got = _metrics(run_dir)
    for step in steps:
        assert step in got, f"metrics.jsonl of {run_dir} has no step {step}"
        for key in ("loss", "lr", "grad_norm", "weight_sum", "delta_sum"):
            assert got[step][key] == reference[step][key], (step, key, got[step][key], reference[step][key])


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, Any]]]:
    """The uninterrupted 6-step run and its per-step metrics."""
    run_dir = tmp_path_factory.mktemp("resume") / "reference"
    launch = Launch(run_dir)
    try:
        launch.finish()
    finally:
        launch.kill()
    metrics = _metrics(run_dir)
    assert sorted(metrics) == list(range(1, MAX_STEPS + 1))
    # Warms up this process's unpickling of DCP metadata (imports megatron), so that the polls
    # below react within milliseconds.
    assert checkpoint_problem(_checkpoint(run_dir, MAX_STEPS)) is None
    return run_dir, metrics


@pytest.fixture(scope="module")
def killed_after_step_4(
    reference: tuple[Path, dict[int, dict[str, Any]]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A run SIGKILLed (both ranks) as soon as its step-4 checkpoint is complete: (run dir, a copy).

    At that moment the ``-last`` copy of step 4 is usually being written (left behind with NeMo's
    ``-unfinished`` marker) and step 2's ``-last`` copy may not be deleted yet. The SIGKILL test
    relaunches the run dir in place; the damage test works on a copy made before that.
    """
    del reference  # only its order: the kill must not compete with the reference run for the cores
    base = tmp_path_factory.mktemp("killed")
    run_dir = base / "run"
    launch = Launch(run_dir)
    try:
        launch.wait_until(lambda: _complete(_checkpoint(run_dir, 4)), "the step-4 checkpoint was complete")
        rc = launch.kill()
    finally:
        launch.kill()
    assert rc == -signal.SIGKILL, rc  # killed, not finished
    assert not _checkpoint(run_dir, 6).exists(), "the job got to its final checkpoint before the kill"
    shutil.copytree(run_dir, base / "pristine", symlinks=True)
    return run_dir, base / "pristine"


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


# --------------------------------------------------------------------------- the scenarios


def test_sigkill_then_relaunch_matches_uninterrupted_run(
    reference: tuple[Path, dict[int, dict[str, Any]]],
    killed_after_step_4: tuple[Path, Path],
    launches: list[Launch],
) -> None:
    reference_dir, reference_metrics = reference
    run_dir = killed_after_step_4[0]
    # Steps before the kill match the reference (the baseline itself is deterministic).
    _assert_same_losses(run_dir, reference_metrics, range(1, 5))
    assert newest_complete_checkpoint(run_dir / "checkpoints") == _checkpoint(run_dir, 4)

    launch = _launch(launches, run_dir)  # the same command, the same run dir
    launch.finish()
    assert _restored_from(launch.log) == _checkpoint(run_dir, 4)
    assert _steps_in(run_dir, launch) == [5, 6]  # only the steps after the checkpoint were run again
    _assert_same_losses(run_dir, reference_metrics, range(1, MAX_STEPS + 1))
    _assert_same_final_state(run_dir, reference_dir)
    # NeMo removed the -last copy cut off by the kill, and top-k bookkeeping carried on.
    assert not list((run_dir / "checkpoints").glob("*-unfinished"))
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (reference_dir / "checkpoints").iterdir()), names


def test_sigterm_checkpoints_exits_0_and_relaunch_finishes(
    reference: tuple[Path, dict[int, dict[str, Any]]], tmp_path: Path, launches: list[Launch]
) -> None:
    reference_dir, reference_metrics = reference
    run_dir = tmp_path / "run"
    launch = _launch(launches, run_dir)
    # Signalled once step 2's regular checkpoint is written: the stop comes at the end of step 3
    # (or later on a slow machine), so what the relaunch resumes from is the preemption save alone.
    launch.wait_until(lambda: _complete(_checkpoint(run_dir, 2)), "the step-2 checkpoint was complete")
    launch.proc.send_signal(signal.SIGTERM)  # rank 0 only: it broadcasts the stop flag to rank 1
    launch.finish()  # exit status 0
    assert "Preemption detected, saving checkpoint and exiting" in launch.log
    stopped_at = max(_metrics(run_dir))
    assert 3 <= stopped_at < MAX_STEPS, stopped_at
    saved = newest_complete_checkpoint(run_dir / "checkpoints")
    assert saved == _checkpoint(run_dir, stopped_at, last=True), saved
    assert checkpoint_problem(saved) is None
    assert _training_state(saved)["global_step"] == stopped_at
    assert not list((run_dir / "checkpoints").glob("*-unfinished"))

    relaunch = _launch(launches, run_dir)
    relaunch.finish()
    assert _restored_from(relaunch.log) == saved
    assert _steps_in(run_dir, relaunch) == list(range(stopped_at + 1, MAX_STEPS + 1))
    _assert_same_losses(run_dir, reference_metrics, range(1, MAX_STEPS + 1))
    _assert_same_final_state(run_dir, reference_dir)


def test_damaged_newest_checkpoint_is_skipped(
    reference: tuple[Path, dict[int, dict[str, Any]]],
    killed_after_step_4: tuple[Path, Path],
    tmp_path: Path,
    launches: list[Launch],
) -> None:
    """Resume from step 2 when step 4 is damaged; the run dir is also a moved copy of the original."""
    reference_dir, reference_metrics = reference
    run_dir = tmp_path / "run"
    shutil.copytree(killed_after_step_4[1], run_dir, symlinks=True)
    step_4, step_4_last = _checkpoint(run_dir, 4), _checkpoint(run_dir, 4, last=True)
    assert _complete(step_4) and _complete(_checkpoint(run_dir, 2))
    # A writer killed mid-file: one shard cut short and no NeMo marker left behind (only the byte
    # ranges recorded in .metadata tell). The -last copy, if the kill let it finish, loses its index.
    shard = sorted((step_4 / "weights").glob("*.distcp"))[-1]
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    if _complete(step_4_last):
        (step_4_last / "weights" / ".metadata").unlink()
    expected_start = newest_complete_checkpoint(run_dir / "checkpoints")
    assert expected_start is not None and _samples(expected_start) == 2 * GLOBAL_BATCH, expected_start

    launch = _launch(launches, run_dir)
    launch.finish()
    warning = f"warning: skipping incomplete checkpoint {step_4}: weights/{shard.name} truncated ("
    assert warning in launch.log, launch.log[-4000:]
    assert _restored_from(launch.log) == expected_start
    assert _steps_in(run_dir, launch) == [3, 4, 5, 6]
    _assert_same_losses(run_dir, reference_metrics, range(1, MAX_STEPS + 1))
    _assert_same_final_state(run_dir, reference_dir)
    # Lightning does not write over the damaged folder: its version counter saves step 4 again
    # beside it (`...-v1`). The damaged one stays, outside top-k bookkeeping, and any later
    # relaunch skips it with the same warning.
    resaved = [p for p in step_4.parent.glob(f"{step_4.name}-v*") if _complete(p)]
    assert resaved, sorted(p.name for p in step_4.parent.iterdir())
    assert checkpoint_problem(step_4) is not None


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
