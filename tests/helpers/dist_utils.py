"""Run a function in several real processes joined by a gloo process group.

Each worker is forked (fast: torch is already imported, no CUDA exists to be forked) by the
production launcher, :func:`nemo_dcod.parallel.launch.run_local`: it joins a ``gloo`` group over
TCP on loopback, runs ``fn(rank, world_size, *args)`` with one thread, and sends its (picklable)
result back. A failure or death of any rank fails the caller with that rank's traceback or exit
code; a hang fails it after ``timeout`` seconds (420 by default: generous for 2 loaded cores),
with every unfinished rank's Python stack. Forking is safe because the launching (pytest) process
keeps no thread pool that a child could need: the one measured exception, process groups that
megatron-core's ``destroy_model_parallel`` leaves alive, is closed by ``tests/conftest.py`` after
every test (nemo_dcod/parallel/state.py; tests/distributed/test_parallel_state.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from nemo_dcod.parallel.launch import run_local


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 420.0) -> list[Any]:
    """``[fn(0, W, *args), ..., fn(W-1, W, *args)]``, each computed in its own forked gloo process
    with one thread (:func:`nemo_dcod.parallel.launch.run_local`)."""
    return run_local(fn, world_size, *args, timeout=timeout, start_method="fork", threads=1)


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
