"""Run a function in several real processes joined by a gloo process group.

Each worker is forked (fast: torch is already imported, no CUDA exists to be forked), joins a
``gloo`` group over TCP on loopback, runs ``fn(rank, world_size, *args)`` with one thread, and
sends its (picklable) result back. A failure in any rank fails the caller with that rank's
traceback; a hang fails it after ``timeout`` seconds.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from nemo_dcod.parallel.launch import free_port


def _detached(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_detached(v) for v in obj)
    return obj


def _worker(fn: Callable[..., Any], rank: int, world: int, port: int, results: Any, args: tuple) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
        out = _detached(fn(rank, world, *args))
        results.put((rank, None, pickle.dumps(out)))  # pickled here so a failure is reported
    except BaseException:
        results.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """``[fn(0, W, *args), ..., fn(W-1, W, *args)]``, each computed in its own gloo process."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, port, results, args), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    try:
        for _ in range(world_size):
            rank, error, out = results.get(timeout=timeout)
            if error is not None:
                raise AssertionError(f"rank {rank} of {world_size} failed:\n{error}")
            outs[rank] = pickle.loads(out)
    except queue.Empty as exc:
        raise AssertionError(f"distributed run timed out after {timeout}s; got ranks {sorted(outs)}") from exc
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [outs[r] for r in range(world_size)]


def new_subgroups(world: int, size: int) -> tuple[Any, Any]:
    """Megatron-style TP groups of consecutive ranks and DP groups across them, for this rank.

    Every rank must create every group (``new_group`` is collective), in the same order.
    """
    rank = dist.get_rank()
    tp_group = dp_group = None
    for start in range(0, world, size):
        g = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            tp_group = g
    for offset in range(size):
        g = dist.new_group(list(range(offset, world, size)))
        if rank % size == offset:
            dp_group = g
    return tp_group, dp_group
