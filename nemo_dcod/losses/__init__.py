"""Losses as pure tensor math: DisCorD and its baselines, all in Megatron's per-token form.

Pick one by name with :func:`build_loss`; every loss is a ``TokenLoss``:
``loss(LossInputs, LossContext) -> (loss_sum, num_tokens, metrics)``.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from nemo_dcod.losses.baselines import DFTLoss, IWSFTLoss, KLLoss, SFTLoss, ToDiLoss
from nemo_dcod.losses.diagnostics import derive_metrics, reduce_metrics
from nemo_dcod.losses.discord import DisCorDLoss
from nemo_dcod.losses.types import (
    LossContext,
    LossInputs,
    LossOutput,
    LossRequirements,
    TokenLoss,
    WeightStats,
)
from nemo_dcod.losses.weights import LambdaSchedule

LossName = Literal["discord", "sft", "dft", "iw_sft", "kl", "todi"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)

_CLASSES: dict[str, Any] = {
    "discord": DisCorDLoss,
    "sft": SFTLoss,
    "dft": DFTLoss,
    "iw_sft": IWSFTLoss,
    "kl": KLLoss,
    "todi": ToDiLoss,
}


def build_loss(name: str, **params: Any) -> TokenLoss:
    """The loss called ``name`` with its hyper-parameters, e.g. ``build_loss("discord", tau=2.0)``.

    Raises:
        ValueError: unknown name or parameter, naming the valid ones.
    """
    if name not in _CLASSES:
        raise ValueError(f"loss.name={name!r} is not one of {', '.join(LOSS_NAMES)}.")
    cls = _CLASSES[name]
    valid = set(cls.__dataclass_fields__)
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ValueError(f"loss {name!r} has no parameter(s) {unknown}; it takes {sorted(valid) or 'none'}.")
    loss: TokenLoss = cls(**params)
    return loss


__all__ = [
    "LOSS_NAMES",
    "DFTLoss",
    "DisCorDLoss",
    "IWSFTLoss",
    "KLLoss",
    "LambdaSchedule",
    "LossContext",
    "LossInputs",
    "LossName",
    "LossOutput",
    "LossRequirements",
    "SFTLoss",
    "ToDiLoss",
    "TokenLoss",
    "WeightStats",
    "build_loss",
    "derive_metrics",
    "reduce_metrics",
]
