"""Shared fixtures: restore torch's global state after every test; skip GPU tests without a GPU."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))  # tests/dist_utils.py and friends


@pytest.fixture(autouse=True)
def _restore_torch_state() -> Iterator[None]:
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    if dist.is_initialized():
        dist.destroy_process_group()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs on the GPU machine (tests/gpu/)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
