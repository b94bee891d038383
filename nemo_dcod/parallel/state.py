"""Ending megatron-core's parallel state completely.

megatron-core 0.15.3's ``parallel_state.destroy_model_parallel`` resets most of its process-group
globals but not all: ``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP``, its ``_GLOO`` twin and
``_HIERARCHICAL_CONTEXT_PARALLEL_GROUPS`` keep referencing their groups, so those groups and their
gloo worker threads outlive ``torch.distributed.destroy_process_group``. A process forked after that
inherits the Python objects without the threads; the next ``initialize_model_parallel`` there
reassigns the global, the inherited group's destructor joins worker threads that do not exist in
the child, and the child hangs for ever. Measured 2026-12-08 (gdb: ``~ProcessGroupGloo`` →
``std::thread::join`` under ``parallel_state.py:857``): after the real-model tests had loaded a
checkpoint in the pytest process, every later forked one-rank gloo worker hung (CI: six tests,
420 s each). :func:`destroy_model_parallel` frees whatever groups the library leaves behind, in the
process that still has their threads.
"""

from __future__ import annotations

from typing import Any

__all__ = ["destroy_model_parallel", "leftover_groups"]


def _holds_group(value: Any) -> bool:
    import torch.distributed as dist

    if isinstance(value, dist.ProcessGroup):
        return True
    if isinstance(value, list | tuple | set):
        return any(_holds_group(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_group(v) for v in value.values())
    return False


def leftover_groups() -> list[str]:
    """The names of megatron-core's ``parallel_state`` globals that still reference a process
    group (none after :func:`destroy_model_parallel`)."""
    from megatron.core import parallel_state

    return sorted(
        name for name, value in vars(parallel_state).items() if name.isupper() and _holds_group(value)
    )


def destroy_model_parallel() -> None:
    """megatron-core's ``destroy_model_parallel``, then every process group it leaves referenced
    (see the module docstring): set to None here, each is destroyed in this process."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    for name in leftover_groups():
        setattr(parallel_state, name, None)
