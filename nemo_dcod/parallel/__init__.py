"""Megatron-parallel building blocks: the shared layout section, vocab-parallel log-prob ops, the
loss inputs built from a logit shard, the local launcher and the CPU mode.

Importing the package loads no torch (the layout section validates configs without it); the ops
are loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "VocabParallelOutput": "nemo_dcod.parallel.vocab_parallel",
    "vocab_parallel_entropy": "nemo_dcod.parallel.vocab_parallel",
    "vocab_parallel_logprobs": "nemo_dcod.parallel.vocab_parallel",
    "vocab_parallel_target_logprobs": "nemo_dcod.parallel.vocab_parallel",
    "vocab_parallel_topk_forward_kl": "nemo_dcod.parallel.vocab_parallel",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nemo_dcod.parallel' has no attribute {name!r}")


__all__ = list(_LAZY)
