"""Every rank's random-number generators in its checkpoints, so that a run with dropout resumes exactly.

NeMo 2 checkpoints hold no RNG state: a relaunch reseeds from ``seed``, so a resumed run with
dropout draws other masks than the uninterrupted one from the first step after the checkpoint.
What dropout draws from differs per rank:

* ``torch`` (the default CPU generator) and, with CUDA, the current device's generator: hidden
  dropout (the bias-dropout-add of every layer) draws from it; Megatron seeds it with
  ``seed + 100 · pp_rank``, so it differs per pipeline stage;
* Megatron's CUDA RNG tracker (``tensor_parallel.get_cuda_rng_tracker()``): attention dropout
  inside the tensor-parallel region forks its ``model-parallel-rng`` state, seeded
  ``seed + 2718 + tp_rank`` (on CPU the CPU mode keeps these as CPU generator states);
* Python's ``random`` and numpy's global generator, for anything else drawn on the host.

They cannot go into the common state (``common.pt``, written by rank 0 alone). They are saved as
megatron-core's per-rank ``ShardedObject`` ``rng_state`` of global shape ``(PP, TP)`` at offset
``(pp_rank, tp_rank)``, as Megatron-LM saves its ``rng_state``: the data-parallel (and
context-parallel) replicas' states are gathered into one list, stored once by replica 0 (with
packed rows of varying length the replicas' dropout draws differ in count, so their states do
too). A checkpoint of another TP/PP layout, or one saved before this callback, holds no entry for
this layout: the resume goes on with freshly seeded generators and says so.

When they are taken and put back matters, because other code draws from the same generators
between a checkpoint and the next step: a ``DataLoader`` draws a base seed from ``torch`` each
time an iterator is made (the resumed run makes its training iterator after the restore) and
validation makes one too. So the states are taken when the checkpoint is written (at the end of a
step), put back just before the first step after a resume (``on_train_batch_start``), and
validation during training is made neutral: the generators are reset after it to their state at
the end of the step before it (``on_train_batch_end`` runs before the checkpoint callbacks and
before validation).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from nemo.lightning import io

__all__ = ["RNG_STATE_KEY", "CarryRngStates", "capture_rng_states", "restore_rng_states"]

RNG_STATE_KEY = "rng_state"
"""The checkpoint entry (a ``ShardedObject``) that holds the generators of every rank."""


def capture_rng_states() -> dict[str, Any]:
    """This process's generator states (copies): ``random``, ``numpy``, ``torch``, ``cuda`` (with
    CUDA) and ``tracker`` (Megatron's CUDA RNG tracker, name -> state)."""
    from megatron.core import tensor_parallel

    states: dict[str, Any] = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": {
            name: state.clone() if isinstance(state, torch.Tensor) else state
            for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items()
        },
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_states` took (``cuda`` only where CUDA is available)."""
    from megatron.core import tensor_parallel

    random.setstate(states["random"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available() and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(states["tracker"]))


def _layout() -> tuple[tuple[int, int], tuple[int, int], int, int, Any]:
    """(global shape, offset, replica id, replica count, replica group) of this rank's entry."""
    from megatron.core import parallel_state as ps

    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    group = ps.get_data_parallel_group(with_context_parallel=True)
    replica = ps.get_data_parallel_rank(with_context_parallel=True)
    replicas = ps.get_data_parallel_world_size(with_context_parallel=True)
    return shape, offset, replica, replicas, group


def sharded_rng_states() -> Any:
    """This rank's ``ShardedObject``: the states of every data-parallel replica of its (PP, TP) place.

    A collective over the data-parallel group (with context parallelism): every rank calls it.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape, offset, replica, replicas, group = _layout()
    gathered: list[Any] = [None] * replicas
    if replicas > 1:
        torch.distributed.all_gather_object(gathered, capture_rng_states(), group=group)
    else:
        gathered = [capture_rng_states()]
    return ShardedObject(RNG_STATE_KEY, gathered, shape, offset, replica_id=replica)


def load_rng_states(weights: Path) -> dict[str, Any] | None:
    """This rank's states from the distributed checkpoint in ``weights`` (a NeMo ``<ckpt>/weights``);
    None, with a message, when it holds none for this layout.

    A collective over all ranks (megatron-core's load plans over the default group).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint import FileSystemReader

    shape, offset, replica, replicas, _ = _layout()
    template = ShardedObject(RNG_STATE_KEY, None, shape, offset, replica_id=replica)
    saved = FileSystemReader(str(weights)).read_metadata().state_dict_metadata
    if template.unique_key not in saved:
        layouts = sorted(k for k in saved if k.startswith(f"{RNG_STATE_KEY}/"))
        print(
            f"warning: {weights} holds no RNG states for this layout ({template.unique_key}; "
            f"{'it has ' + ', '.join(layouts) if layouts else 'saved without them'}): the generators "
            "are freshly seeded, so dropout after the resume differs from an uninterrupted run.",
            file=sys.stderr,
            flush=True,
        )
        return None
    loaded = dist_checkpointing.load(
        {RNG_STATE_KEY: template}, str(weights), strict=StrictHandling.ASSUME_OK_UNEXPECTED
    )
    states: list[dict[str, Any]] = loaded[RNG_STATE_KEY]
    # Another data-parallel size: replica 0's states for every replica (as Megatron-LM does).
    return states[replica] if len(states) == replicas else states[0]


class CarryRngStates(pl.Callback, io.IOMixin):
    """Saves every rank's generators with each checkpoint and puts them back on resume (see module).

    An ``IOMixin`` without arguments: NeMo records it in a checkpoint's context by its class.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None
        self._after_step: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Add this rank's ``rng_state`` entry (the strategy saves the dict as a distributed checkpoint)."""
        del trainer, pl_module
        checkpoint[RNG_STATE_KEY] = sharded_rng_states()

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Read this rank's states from the checkpoint being restored; applied before the next step."""
        del pl_module, checkpoint
        from nemo.lightning.io.pl import ckpt_to_weights_subdir

        if trainer.ckpt_path:
            self._pending = load_rng_states(Path(ckpt_to_weights_subdir(trainer.ckpt_path, is_saving=False)))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """The first step after a resume starts from the generators of the checkpoint."""
        del trainer, pl_module, batch, batch_idx
        if self._pending is not None:
            restore_rng_states(self._pending)
            self._pending = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Remember the generators at the end of the step, for :meth:`on_validation_end`."""
        del trainer, pl_module, outputs, batch, batch_idx
        self._after_step = capture_rng_states()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validation inside training leaves the generators as the step before it left them."""
        del pl_module
        from lightning.pytorch.trainer.states import TrainerFn

        if trainer.state.fn == TrainerFn.FITTING and self._after_step is not None:
            restore_rng_states(self._after_step)
