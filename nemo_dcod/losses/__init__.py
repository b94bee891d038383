"""Losses as pure tensor math: DisCorD and its baselines, all in Megatron's per-token form.

Every loss is one module that registers a dataclass by name (:mod:`~nemo_dcod.losses.registry`):
``sft``, ``dft``, ``iw_sft``, ``kl``, ``todi`` and ``discord`` (its Δ variants in
:mod:`~nemo_dcod.losses.variants`). Build one with :func:`build_loss`; each is a ``TokenLoss``:
``loss(LossInputs, LossContext) -> (loss_sum, num_tokens, metrics)``.

Importing this package (and the registry, and a loss module) loads no torch: configs validate and
``--help`` runs without it. The tensor types and helpers are loaded on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from nemo_dcod.losses.registry import LossRequirements, build_loss, loss_class, loss_names, register

_LAZY = {
    "LossContext": "nemo_dcod.losses.types",
    "LossInputs": "nemo_dcod.losses.types",
    "LossOutput": "nemo_dcod.losses.types",
    "TokenLoss": "nemo_dcod.losses.types",
    "WeightStats": "nemo_dcod.losses.types",
    "derive_metrics": "nemo_dcod.losses.diagnostics",
    "reduce_metrics": "nemo_dcod.losses.diagnostics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nemo_dcod.losses' has no attribute {name!r}")


__all__ = [
    "LossContext",
    "LossInputs",
    "LossOutput",
    "LossRequirements",
    "TokenLoss",
    "WeightStats",
    "build_loss",
    "derive_metrics",
    "loss_class",
    "loss_names",
    "reduce_metrics",
    "register",
]
