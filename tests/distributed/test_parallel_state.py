"""A forked gloo worker after Megatron's parallel state ran in the launching process.

megatron-core 0.15.3's ``destroy_model_parallel`` leaves some process groups referenced; a process
forked afterwards hung for ever in its own ``initialize_model_parallel`` (the inherited group's
destructor joins worker threads the child does not have). ``nemo_dcod.parallel.state`` frees them;
``megatron_parallel`` and the importer's teardown use it. Measured cause and CI symptom:
nemo_dcod/parallel/state.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers.dist_utils import run_distributed

pytestmark = pytest.mark.distributed


def _initialize(rank: int, world: int) -> int:
    from megatron.core import parallel_state

    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode
    from nemo_dcod.parallel.state import destroy_model_parallel

    enable_cpu_mode()
    parallel_state.initialize_model_parallel(1, 1)
    size = parallel_state.get_data_parallel_world_size()
    destroy_model_parallel()
    return int(size)


def test_a_fork_after_megatron_parallel_initializes_its_own_state() -> None:
    from megatron.core import parallel_state

    from nemo_dcod.model.loading import megatron_parallel
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode
    from nemo_dcod.parallel.state import leftover_groups

    enable_cpu_mode()
    with megatron_parallel(1):
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
    assert leftover_groups() == []
    # Without the fix this fork hangs in initialize_model_parallel (the test then fails on the
    # timeout, with the rank's stack: nemo_dcod.parallel.launch.run_local).
    assert run_distributed(_initialize, 1, timeout=120) == [1]


def test_megatron_core_alone_leaves_groups_that_ours_frees() -> None:
    """What the fix is for, checked against the pinned megatron-core (if a release resets every
    group itself, the first assertion says so and the workaround can go)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode
    from nemo_dcod.parallel.state import destroy_model_parallel, leftover_groups

    enable_cpu_mode()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        parallel_state.destroy_model_parallel()
        left: Any = leftover_groups()
        assert "_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP" in left, left
        destroy_model_parallel()
        assert leftover_groups() == []
    finally:
        dist.destroy_process_group()


def _sleep(rank: int, world: int) -> None:
    import time

    if rank == 1:
        time.sleep(600)


def test_a_hung_rank_is_reported_with_its_stack() -> None:
    """run_local's timeout names the ranks that did not finish and where each one was."""
    with pytest.raises(RuntimeError) as err:
        run_distributed(_sleep, 2, timeout=15)
    text = str(err.value)
    assert "timed out after 15s; finished ranks: [0]" in text, text
    assert "rank 1:" in text and "in _sleep" in text and "rank 0:" not in text, text
