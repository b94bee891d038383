"""CPU stages size torch's thread pool from the cores the process is given (its CPU affinity) and
the ranks sharing them, not from the machine's core count (issue 22: oversubscribed, a 135M
forward took 19.7 s instead of 0.9 s)."""

from __future__ import annotations

import os

import pytest
import torch

from nemo_dcod.parallel.threads import available_cores, local_ranks, set_cpu_threads


@pytest.fixture
def no_omp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine keeps torch's threads")
def test_threads_follow_the_affinity_and_the_ranks(no_omp: None) -> None:
    cores = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(cores)})  # as `taskset -c 0` or a 1-CPU Slurm step gives it
        assert available_cores() == 1
        assert set_cpu_threads(4) == 1 and torch.get_num_threads() == 1  # never 0
    finally:
        os.sched_setaffinity(0, cores)
    assert available_cores() == len(cores)
    assert set_cpu_threads(1) == len(cores) == torch.get_num_threads()
    assert set_cpu_threads(len(cores) * 2) == 1


def test_the_users_omp_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    assert set_cpu_threads(1) is None and torch.get_num_threads() == before


def test_local_ranks_from_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    assert local_ranks(3) == 3
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    assert local_ranks(8) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert local_ranks(8) == 2
