"""Test points of a training run: fault injection and one rank's view of the checkpoints.

:func:`~nemo_dcod.train.run.run_train` takes an optional :class:`TrainHooks`; ``nemo-dcod train``
passes none. The resume tests (``tests/distributed/test_train_resume.py``, through
``tests/helpers/faults.py``) use them to SIGKILL every rank in the middle of a checkpoint write (a
Lightning callback that reaches the checkpoint IO's save) and to let one rank see a complete
checkpoint as incomplete (the per-rank view that :class:`~nemo_dcod.train.callbacks.ResumeAsRankZero`
must overrule). Nothing here reads the environment: a hook reaches a run only as this argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TrainHooks"]


@dataclass(frozen=True)
class TrainHooks:
    """Extra parts of one training process (every rank builds its own)."""

    callbacks: tuple[Any, ...] = ()
    """Lightning callbacks added to the trainer after it is built (so never recorded in a
    checkpoint's context)."""
    checkpoint_problem: Callable[[Path], str | None] | None = None
    """This rank's completeness check of a checkpoint folder, in place of
    :func:`~nemo_dcod.train.checkpoints.checkpoint_problem` (None: that one)."""
