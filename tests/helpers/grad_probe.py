"""A training run's per-parameter gradients and the samples each rank read, for the layout tests.

:class:`RecordGradients` is a Lightning callback for ``run_train(cfg, hooks=TrainHooks(callbacks=
(...)))`` (:mod:`nemo_dcod.train.hooks`). For each of the first ``steps`` optimizer steps every rank
writes ``<out_dir>/step<k>/rank<r>.pt``:

* ``grads``: each parameter this rank holds, by its *global* name (the layer number within the
  chunk replaced by Megatron's global ``layer_number - 1``, so PP stages and virtual-PP chunks name
  the same layer alike), as ``{"grad", "tensor_parallel", "partition_dim", "partition_stride",
  "sequence_parallel", "chunk", "local_name"}``;
* the rank's place: ``tp_rank``/``tp_size``, ``pp_rank``/``pp_size``, ``dp_rank``/``dp_size``,
  ``vpp_size``;
* ``samples``: the training-set indices this rank's dataloader served during the step, in order
  (the data module's ``train_ds`` is wrapped in :class:`RecordingDataset` at setup, before the
  dataloader is made), and ``rows``: the store row each of them served (the data order's
  :meth:`~nemo_dcod.data.module.EpochRows.row`; None for a source without rows).

**Which gradient.** Lightning calls ``on_before_optimizer_step`` after the closure (NeMo's
``MegatronStrategy.training_step``: Megatron's forward-backward schedule, ending in
``finalize_model_grads``: the all-reduce over data-parallel ranks, the all-reduce of
sequence-parallel norm weights over the TP group, the division by the global token count) and
before ``McoreDistributedOptimizer.step`` calls Megatron's optimizer, which copies ``main_grad``
to ``.grad``, measures the norm and clips. ``param.main_grad`` (a view into DDP's grad buffer) is
therefore the reduced, unclipped gradient of the step's loss.

Entry point: ``python tests/helpers/grad_probe.py <out_dir> <steps> key=value ...`` is ``nemo-dcod train
key=value ...`` with this callback (Lightning starts the other ranks with the same command line).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import Dataset

__all__ = ["RecordGradients", "RecordingDataset", "StepGradients", "read_step"]


class RecordingDataset(Dataset[dict[str, torch.Tensor]]):
    """``base`` unchanged, noting every index asked for in ``served``."""

    def __init__(self, base: Any, served: list[int]) -> None:
        self.base, self.served = base, served

    def row(self, index: int) -> int | None:
        """The store row behind sample ``index`` (None when the source has no rows)."""
        row = getattr(self.base, "row", None)
        return None if row is None else int(row(index))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.served.append(int(index))
        item: dict[str, torch.Tensor] = self.base[index]
        return item


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _global_names(chunk: torch.nn.Module) -> dict[int, str]:
    """``id(param) -> global name`` for one model chunk (DDP and other ``module.`` wrappers off)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    def strip(name: str) -> str:
        while name.startswith("module."):
            name = name[len("module.") :]
        return name

    layer_of = {
        strip(name): module.layer_number - 1
        for name, module in chunk.named_modules()
        if isinstance(module, TransformerLayer)
    }
    out = {}
    for name, param in chunk.named_parameters():
        local = strip(name)
        match = _LAYER.match(local)
        if match:
            prefix = match.group(0)[:-1]
            local = f"decoder.layers.{layer_of[prefix]}." + local[len(match.group(0)) :]
        out[id(param)] = local
    return out


class RecordGradients(pl.Callback):
    """Write each rank's reduced, unclipped gradients and served samples for the first ``steps``
    steps under ``out_dir`` (see the module docstring)."""

    def __init__(self, out_dir: str, steps: int) -> None:
        self.out_dir, self.steps = Path(out_dir), steps
        self.served: list[int] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        del pl_module, stage
        data = trainer.datamodule  # type: ignore[attr-defined]
        self.dataset = RecordingDataset(data.train_ds, self.served)
        data.train_ds = self.dataset

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        from megatron.core import parallel_state as ps

        del pl_module, optimizer
        step = trainer.global_step + 1
        if step > self.steps:
            return
        grads: dict[str, dict[str, Any]] = {}
        for chunk_index, chunk in enumerate(trainer.strategy.model):  # type: ignore[attr-defined]
            names = _global_names(chunk)
            for param in chunk.parameters():
                grad = getattr(param, "main_grad", None)
                if grad is None:
                    raise RuntimeError(f"{names[id(param)]}: no main_grad (not under Megatron's DDP?)")
                grads[names[id(param)]] = {
                    "grad": grad.detach().clone().cpu(),
                    "tensor_parallel": bool(getattr(param, "tensor_model_parallel", False)),
                    "partition_dim": int(getattr(param, "partition_dim", -1)),
                    "partition_stride": int(getattr(param, "partition_stride", 1)),
                    "sequence_parallel": bool(getattr(param, "sequence_parallel", False)),
                    "chunk": chunk_index,
                }
        record = {
            "grads": grads,
            "samples": list(self.served),
            "rows": [self.dataset.row(i) for i in self.served],
            "tp_rank": ps.get_tensor_model_parallel_rank(),
            "tp_size": ps.get_tensor_model_parallel_world_size(),
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "pp_size": ps.get_pipeline_model_parallel_world_size(),
            "dp_rank": ps.get_data_parallel_rank(),
            "dp_size": ps.get_data_parallel_world_size(),
            "vpp_size": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        }
        self.served.clear()
        where = self.out_dir / f"step{step}"
        where.mkdir(parents=True, exist_ok=True)
        torch.save(record, where / f"rank{torch.distributed.get_rank()}.pt")


@dataclass
class StepGradients:
    """One step of a run, read back from every rank's file.

    Attributes:
        full: each parameter's gradient as the whole tensor (TP shards concatenated, every PP stage
            and virtual-PP chunk merged under global names).
        samples: ``dp_rank -> indices`` served to that data-parallel rank in the step (the same
            on every rank of the rank's TP x PP group, which is checked).
        rows: ``sample index -> store row`` it served in the step (every rank's).
        replica_diff: the largest difference between two copies of one gradient element (data-
            parallel replicas, TP replicas of norm weights, TP ranks of one PP stage), relative
            to the tensor's largest magnitude: Megatron's reductions must leave them equal.
    """

    full: dict[str, torch.Tensor]
    samples: dict[int, list[int]]
    replica_diff: float
    rows: dict[int, int | None]


def _merge_tp(name: str, shards: list[dict[str, Any]]) -> torch.Tensor:
    """The full gradient of ``name`` from its TP ranks' entries (in TP rank order).

    A TP-sharded parameter is cut in ``tp_size`` contiguous blocks along ``partition_dim``
    (``partition_stride`` 1: checked), except the gated MLP's ``linear_fc1`` (SwiGLU): each rank
    holds ``[gate_r; up_r]``, so the full ``[gate; up]`` takes every rank's gate half, then every
    rank's up half (megatron-core's ``apply_swiglu_sharded_factory`` reads checkpoints so).
    """
    first = shards[0]
    if not first["tensor_parallel"] or len(shards) == 1:
        return first["grad"]
    if any(s["partition_stride"] != 1 for s in shards):
        raise ValueError(f"{name}: partition_stride {first['partition_stride']} is not handled")
    dim, parts = first["partition_dim"], [s["grad"] for s in shards]
    if name.endswith("mlp.linear_fc1.weight"):
        halves = [part.chunk(2, dim=dim) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def read_step(out_dir: Path, step: int) -> StepGradients:
    """Assemble step ``step`` of a run recorded by :class:`RecordGradients` under ``out_dir``."""
    records = [torch.load(f, weights_only=False) for f in sorted((out_dir / f"step{step}").glob("rank*.pt"))]
    if not records:
        raise FileNotFoundError(f"{out_dir / f'step{step}'}: no rank wrote its gradients")
    tp_size = records[0]["tp_size"]
    # name -> tp_rank -> every copy (DP replicas; PP stages if a parameter lived on two)
    copies: dict[str, dict[int, list[dict[str, Any]]]] = {}
    samples: dict[int, list[int]] = {}
    rows: dict[int, int | None] = {}
    for rec in records:
        for index, row in zip(rec["samples"], rec["rows"], strict=True):
            if rows.setdefault(index, row) != row:
                raise AssertionError(f"step {step}: sample {index} read as rows {rows[index]} and {row}")
        seen = samples.setdefault(rec["dp_rank"], rec["samples"])
        if seen != rec["samples"]:
            raise AssertionError(
                f"step {step}: ranks of DP rank {rec['dp_rank']} read {seen} and {rec['samples']}"
            )
        for name, entry in rec["grads"].items():
            copies.setdefault(name, {}).setdefault(rec["tp_rank"], []).append(entry)
    full, replica_diff = {}, 0.0
    for name, by_tp in copies.items():
        if sorted(by_tp) != list(range(tp_size)):
            raise AssertionError(f"step {step}: {name} held by TP ranks {sorted(by_tp)} of {tp_size}")
        for entries in by_tp.values():
            replica_diff = max([replica_diff, *(_relative(e["grad"], entries[0]["grad"]) for e in entries)])
        if not by_tp[0][0]["tensor_parallel"]:
            replica_diff = max(
                [replica_diff, *(_relative(by_tp[t][0]["grad"], by_tp[0][0]["grad"]) for t in by_tp)]
            )
        full[name] = _merge_tp(name, [by_tp[t][0] for t in range(tp_size)])
    return StepGradients(full, samples, replica_diff, rows)


def _train(argv: list[str]) -> None:
    """``<out_dir> <steps> key=value ...``: ``nemo-dcod train`` with :class:`RecordGradients`."""
    from nemo_dcod.config import load_config
    from nemo_dcod.train.config import TrainConfig
    from nemo_dcod.train.hooks import TrainHooks
    from nemo_dcod.train.run import run_train

    hooks = TrainHooks(callbacks=(RecordGradients(argv[0], int(argv[1])),))
    run_train(load_config(TrainConfig, None, argv[2:]), hooks)


if __name__ == "__main__":  # a guard is needed: checkpoint saving may spawn processes
    if len(sys.argv) < 3:
        raise SystemExit("usage: python tests/helpers/grad_probe.py <out_dir> <steps> key=value ...")
    _train(sys.argv[1:])
