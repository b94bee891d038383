"""CPU thread counts from the cores this process is given, not the machine's.

torch's intra-op pool defaults to the machine's core count, whatever the process's CPU affinity
(``taskset``, a Slurm allocation, a container's cpuset) and however many ranks share those cores.
Oversubscribed, a forward of a 135M model on a loaded 2-core machine took 19.7 s instead of 0.9 s
(issue 22). Every CPU stage therefore sets its pool to its share of the cores it may run on:
``len(os.sched_getaffinity(0)) // ranks on this machine``, at least 1. ``OMP_NUM_THREADS`` set by
the user wins; on a GPU machine nothing changes (the host threads matter little there).
"""

from __future__ import annotations

import os

__all__ = ["available_cores", "local_ranks", "set_cpu_threads"]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; the machine's where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def local_ranks(world_size: int) -> int:
    """Ranks of the job on this machine: the launcher's count (``LOCAL_WORLD_SIZE`` from torchrun,
    ``SLURM_NTASKS_PER_NODE``), else all ``world_size`` (ranks started here)."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]  # Slurm may write "4(x2)"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return max(1, world_size)


def set_cpu_threads(ranks_here: int = 1) -> int | None:
    """Set torch's intra-op threads to this process's share of its cores, for a CPU stage.

    Args:
        ranks_here: processes of the job sharing this machine's cores (``trainer.devices``).

    Returns:
        The thread count set; None when nothing was changed (a GPU machine, or ``OMP_NUM_THREADS``
        set by the user).
    """
    import torch

    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, available_cores() // max(1, ranks_here))
    torch.set_num_threads(threads)
    return threads
