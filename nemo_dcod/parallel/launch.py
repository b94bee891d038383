"""Run a function on N local ranks joined by a gloo process group (CPU runs, the demo, benches).

Cluster launches go through ``launchers/`` (Slurm, torchrun); this is the in-process equivalent
for one machine: it spawns fresh interpreters (no forked thread pools), joins them over TCP on
loopback, and returns every rank's result or raises with the failing rank's traceback.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_local"]


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    rank: int, fn: Callable[..., Any], world: int, port: int, threads: int, results: Any, args: tuple
) -> None:
    try:
        torch.set_num_threads(threads)
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
        )
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
        # As bytes: a tensor put on a multiprocessing queue travels as a shared-memory handle that
        # dies with this process, which may exit before the parent reads it.
        buffer = io.BytesIO()
        torch.save(fn(rank, world, *args), buffer)
        results.put((rank, None, buffer.getvalue()))
    except BaseException:
        results.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 1800.0) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, one process per rank.

    ``fn`` must be importable (a module-level function) and its result picklable.

    Raises:
        RuntimeError: with the traceback of the first rank that failed, or on a timeout.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(target=_entry, args=(rank, fn, world_size, port, threads, results, args))
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
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
                        f"timed out after {timeout:.0f}s; finished ranks: {sorted(outs)}"
                    ) from None
                continue
            if error is not None:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{error}")
            outs[rank] = torch.load(io.BytesIO(out), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [outs[r] for r in range(world_size)]
