"""Fault injection for the tests: hooks that SIGKILL a process at a chosen point of a write.

Production code calls its hook after each step of a write (e.g. ``nemo_dcod.score.columns``'s
``on_write(event, shard)``); :class:`KillAt` turns the ``count``-th such event of one rank into a
real ``SIGKILL`` of that rank's process: nothing is flushed, no ``finally`` runs. It is picklable
(a module-level class), so it reaches ranks started with ``spawn``.

Training takes its hooks as ``run_train(cfg, hooks=TrainHooks(...))``
(:mod:`nemo_dcod.train.hooks`). This file is also the test entry point that passes them: every
rank of ``python tests/helpers/faults.py train '<TrainHooks expression>' key=value ...`` runs
``nemo-dcod train key=value ...`` with the hooks the expression builds (Lightning starts the
other ranks with the same command line, so each builds its own):

* :class:`KillMidCheckpointWrite`: every rank SIGKILLs itself in the middle of its ``save``-th
  checkpoint write, after its shard files are written and before the index that completes them;
* :class:`HideCheckpoint`: one rank's completeness check calls a complete checkpoint incomplete
  (a rank whose view of a shared file system lags behind);
* :class:`PlantNonFiniteDelta`: DisCorD's carried statistics receive a NaN Δ in one step, as a NaN
  teacher log-prob would bring with ``loss.validate=false``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from nemo_dcod.parallel.launch import launch_rank

__all__ = ["HideCheckpoint", "KillAt", "KillMidCheckpointWrite", "PlantNonFiniteDelta"]


class KillAt:
    """SIGKILL this process at the ``count``-th ``event`` (on rank ``rank`` only, if given).

    The rank is read from ``RANK`` (set by torchrun, srun wrappers and ``run_local``); 0 if unset.
    """

    def __init__(self, event: str, count: int = 1, rank: int | None = None) -> None:
        self.event, self.count, self.rank = event, count, rank
        self.seen = 0

    def __call__(self, event: str, where: str) -> None:
        del where
        if self.rank is not None and int(os.environ.get("RANK", "0")) != self.rank:
            return
        if event == self.event:
            self.seen += 1
            if self.seen >= self.count:
                os.kill(os.getpid(), signal.SIGKILL)


class KillMidCheckpointWrite(pl.Callback):
    """SIGKILL every rank in the middle of its ``save``-th checkpoint write (1-based, counting each
    folder NeMo writes: a checkpoint step writes its top-k folder, then its ``-last`` copy).

    megatron-core writes a distributed checkpoint in two parts: each rank's shard files
    (``__<rank>_<n>.distcp``; ``common.pt`` from rank 0 before them), then a finalize step in which
    rank 0 writes the ``.metadata`` index and ``metadata.json`` (and NeMo its ``context/`` and the
    removal of its ``-unfinished`` marker). The hook is put first in the save request's finalize
    functions, so each rank dies right after its own shard files are on disk: the checkpoint is
    cut off mid-write, with shard files and no index. It wraps the save strategy's ``async_save``
    on this trainer's checkpoint IO (the synchronous save runs it too) at train start.
    """

    def __init__(self, save: int) -> None:
        self.save, self.saves = save, 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        del pl_module
        strategy = trainer.strategy.unwrapped_checkpoint_io.save_sharded_strategy  # type: ignore[attr-defined]
        write = strategy.async_save

        def async_save(sharded_state_dict: Any, checkpoint_dir: Any) -> Any:
            request = write(sharded_state_dict, checkpoint_dir)
            self.saves += 1
            if self.saves == self.save:
                request.finalize_fns.insert(0, self._kill)
            return request

        strategy.async_save = async_save

    @staticmethod
    def _kill() -> None:
        print(f"faults: rank {launch_rank()} SIGKILLed mid checkpoint write", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


class HideCheckpoint:
    """A completeness check that calls the checkpoint folder ``name`` incomplete on rank ``rank``
    (every other folder, and every folder on the other ranks, gets the real check)."""

    def __init__(self, name: str, rank: int) -> None:
        self.name, self.rank = name, rank

    def __call__(self, path: Path) -> str | None:
        from nemo_dcod.train.checkpoints import checkpoint_problem

        if path.name == self.name and launch_rank() == self.rank:
            return f"hidden from rank {self.rank} by the test"
        return checkpoint_problem(path)


class PlantNonFiniteDelta(pl.Callback):
    """At the start of optimizer step ``step`` (1-based), hand the run's carried DisCorD statistics
    (:class:`~nemo_dcod.losses.carry.CarriedStats`) one NaN Δ on a loss token, beside the step's
    real ones: the step's measured statistics are then NaN, as when a NaN teacher log-prob or an
    overflowed logit reaches Δ with validation off."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        import torch

        del batch, batch_idx
        if trainer.global_step + 1 != self.step:
            return
        carried = pl_module.training_loss_reduction.carried  # type: ignore[attr-defined]
        carried.keep(
            trainer.global_step, torch.full((1, 1), float("nan")), torch.ones(1, 1, dtype=torch.bool)
        )
        print(f"faults: NaN Δ planted in step {self.step}", file=sys.stderr, flush=True)


def _train(argv: list[str]) -> None:
    """``train '<TrainHooks expression>' [--config=PATH] key=value ...``: ``nemo-dcod train`` with
    those hooks."""
    from nemo_dcod.config import load_config
    from nemo_dcod.train.config import TrainConfig
    from nemo_dcod.train.hooks import TrainHooks
    from nemo_dcod.train.run import run_train

    names = {"TrainHooks": TrainHooks, "KillMidCheckpointWrite": KillMidCheckpointWrite}
    names |= {"HideCheckpoint": HideCheckpoint, "PlantNonFiniteDelta": PlantNonFiniteDelta}
    hooks = eval(argv[0], names)  # the tests' own expression
    if not isinstance(hooks, TrainHooks):
        raise SystemExit(f"faults.py train: {argv[0]!r} is no TrainHooks expression")
    rest = argv[1:]
    config = rest.pop(0).removeprefix("--config=") if rest and rest[0].startswith("--config=") else None
    run_train(load_config(TrainConfig, config, rest), hooks)


if __name__ == "__main__":  # a guard is needed: checkpoint saving may spawn processes
    if sys.argv[1:2] != ["train"] or len(sys.argv) < 3:
        raise SystemExit(
            "usage: python tests/helpers/faults.py train '<TrainHooks expression>' key=value ..."
        )
    _train(sys.argv[2:])
