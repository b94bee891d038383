"""Run a function on N local ranks joined by a gloo process group (CPU runs, the demo, benches),
and read which rank or worker a process is from its launcher's environment.

Cluster launches go through ``launchers/`` (Slurm, torchrun); :func:`run_local` is the in-process
equivalent for one machine: it spawns fresh interpreters (no forked thread pools), joins them over
TCP on loopback, and returns every rank's result or raises with the failing rank's traceback.

:func:`launcher_ranks` and :func:`worker_slot` are the one place the launchers' variables are
parsed: torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``, srun's ``SLURM_PROCID`` /
``SLURM_NTASKS`` / ``SLURM_LOCALID``, and a Slurm job array's ``SLURM_ARRAY_TASK_*``.
"""

from __future__ import annotations

import faulthandler
import io
import os
import queue
import signal
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["WorkerSlot", "free_port", "launch_rank", "launcher_ranks", "run_local", "worker_slot"]


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _detached(obj: Any) -> Any:
    """``obj`` with every tensor in it (in dicts, lists, tuples) detached from autograd."""
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_detached(v) for v in obj)
    return obj


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world: int,
    port: int,
    threads: int,
    results: Any,
    args: tuple,
    stacks: str,
) -> None:
    # SIGUSR1 writes every thread's Python stack to `stacks`: how run_local says where a rank hung.
    stack_file = open(stacks, "w")  # noqa: SIM115 (open for the process's life, as faulthandler needs)
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    try:
        torch.set_num_threads(threads)
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
        )
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
        # As bytes: a tensor put on a multiprocessing queue travels as a shared-memory handle that
        # dies with this process, which may exit before the parent reads it. Without its graph:
        # only what the rank computed travels.
        buffer = io.BytesIO()
        torch.save(_detached(fn(rank, world, *args)), buffer)
        results.put((rank, None, buffer.getvalue()))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 1800.0,
    start_method: Literal["spawn", "fork"] = "spawn",
    threads: int | None = None,
) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, one process per rank.

    Args:
        start_method: ``spawn`` (fresh interpreters: ``fn`` must be importable, a module-level
            function) or ``fork`` (fast where torch is already imported and no CUDA or thread
            pool exists yet, as in the tests; ``fn`` may then be a closure).
        threads: torch threads per rank; None: the cores shared out over the ranks.

    The result must be picklable (tensors arrive detached).

    Raises:
        RuntimeError: with the traceback of the first rank that failed, or on a timeout.
    """
    ctx = mp.get_context("fork") if start_method == "fork" else mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    stack_dir = tempfile.TemporaryDirectory(prefix="run_local_stacks_")
    stacks = [os.path.join(stack_dir.name, f"rank{rank}.txt") for rank in range(world_size)]
    procs = [
        ctx.Process(target=_entry, args=(rank, fn, world_size, port, threads, results, args, stacks[rank]))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    grace = 1.0  # seconds each rank gets to exit after a failure (the others may wait in a collective)
    try:
        while len(outs) < world_size:
            try:
                rank, error, out = results.get(timeout=2.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outs]
                if dead:
                    raise RuntimeError(
                        f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"timed out after {timeout:.0f}s; finished ranks: {sorted(outs)}; where the "
                        f"others were:\n{_hung_stacks(procs, stacks, outs)}"
                    ) from None
                continue
            if error is not None:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{error}")
            outs[rank] = torch.load(io.BytesIO(out), weights_only=False)
        grace = 30.0  # every rank answered: let each end its process group and exit
    finally:
        for p in procs:
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
        stack_dir.cleanup()
    return [outs[r] for r in range(world_size)]


def _hung_stacks(procs: list[Any], stacks: list[str], finished: Mapping[int, Any]) -> str:
    """The Python stacks of the unfinished ranks (SIGUSR1 makes each write them; see ``_entry``),
    with the launching process's thread count: a fork from a process with threads can deadlock."""
    for rank, p in enumerate(procs):
        if rank not in finished and p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGUSR1)
    time.sleep(2.0)
    tasks = "/proc/self/task"
    parts = [f"launching process: {len(os.listdir(tasks)) if os.path.isdir(tasks) else '?'} threads"]
    for rank, path in enumerate(stacks):
        if rank not in finished:
            try:
                with open(path) as f:
                    text = f.read().strip()
            except OSError:
                text = ""
            parts.append(f"rank {rank}:\n{text or '(no stack written: the rank did not reach Python)'}")
    return "\n".join(parts)


def launcher_ranks(env: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun or srun, or None when started plainly.

    torchrun's ``RANK`` / ``WORLD_SIZE`` win; srun's ``SLURM_PROCID`` / ``SLURM_NTASKS`` count only
    for a step of more than one task (a batch script's own shell has ``SLURM_PROCID=0`` too).
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return None


def launch_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's global rank before any process group exists (0 when started plainly).

    The launcher's rank (:func:`launcher_ranks`: torchrun, or an srun step of several tasks), or,
    for the ranks Lightning starts itself on one node (``trainer.devices=N``), ``LOCAL_RANK``
    (unset in the process that starts them).
    """
    env = os.environ if env is None else env
    ranks = launcher_ranks(env)
    return ranks[0] if ranks is not None else int(env.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class WorkerSlot:
    """Which of ``count`` independent workers this process is (workers that share nothing but a
    plan: each takes the units of work ``i`` with ``i % count == index``)."""

    index: int
    count: int
    local_rank: int
    """The process's rank on its node (picks its GPU); 0 when started plainly."""
    source: str
    """Where index and count came from, for the log (``torchrun``, ``srun``, ``slurm array``...)."""


def _array_task(env: Mapping[str, str]) -> tuple[int, int] | None:
    """(index, count) of a Slurm array task, or None outside an array.

    Raises:
        ValueError: an array whose task ids are not a regular range (``--array=1,4,9``).
    """
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    task = int(env["SLURM_ARRAY_TASK_ID"])
    first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
    step = int(env.get("SLURM_ARRAY_TASK_STEP", "1")) or 1
    if "SLURM_ARRAY_TASK_COUNT" in env:
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    else:
        count = (int(env.get("SLURM_ARRAY_TASK_MAX", str(task))) - first) // step + 1
    index, off = divmod(task - first, step)
    if off or not 0 <= index < count:
        raise ValueError(
            f"Slurm array task {task} (min {first}, step {step}, {count} tasks) is not on a regular "
            "range: submit with --array=A-B[:step], or give the worker index and count explicitly."
        )
    return index, count


def worker_slot(env: Mapping[str, str] | None = None) -> WorkerSlot:
    """This process's worker index and count from its launcher (see the module docstring).

    A job array of ``A`` tasks whose steps run ``R`` ranks each has ``A x R`` workers; array task
    ``a``'s rank ``r`` is worker ``a x R + r``. Started plainly: worker 0 of 1.

    Raises:
        ValueError: an array without a regular range of task ids.
    """
    env = os.environ if env is None else env
    array = _array_task(env)
    ranks = launcher_ranks(env)
    rank, world, local = ranks if ranks is not None else (0, 1, 0)
    source = ("torchrun" if "RANK" in env and "WORLD_SIZE" in env else "srun") if ranks else ""
    if array is None:
        return WorkerSlot(rank, world, local, source or "not launched (one worker)")
    a, count = array
    where = "slurm array" + (f" x {source}" if source else "")
    return WorkerSlot(a * world + rank, count * world, local, where)
