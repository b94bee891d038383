"""The parallel layout and the launch every Megatron stage shares (``train``, ``score``): one section
each, one set of checks.

Names are megatron-core's (``TransformerConfig``). :meth:`ParallelSection.problems` holds every check
that depends only on the layout, the world size and the model's shape; a stage adds what is its own
(batch sizes, sequence lengths, precision). Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LaunchSection", "ModelShape", "ParallelSection"]

ModelShape = tuple[int, int, int]
"""(num_layers, num_attention_heads, num_query_groups) of a model."""


@dataclass
class LaunchSection:
    """The job's processes. Every Megatron stage's ``trainer`` section starts with these keys, so
    ``launchers/slurm.sh`` and the Slurm recipes set them the same way for train and score."""

    devices: int = 1
    """Processes per node (one per GPU; on CPU, gloo processes). Under torchrun or srun the
    launcher's ranks are used and must number devices x num_nodes."""
    num_nodes: int = 1
    """Nodes."""

    @property
    def world_size(self) -> int:
        """Processes in the job: devices x num_nodes."""
        return self.devices * self.num_nodes

    def launch_problems(self, prefix: str = "trainer") -> list[str]:
        """The problems of these keys, named ``<prefix>.<key>``."""
        sizes = {"devices": self.devices, "num_nodes": self.num_nodes}
        return [f"{prefix}.{key}={value}: must be >= 1." for key, value in sizes.items() if value < 1]


@dataclass
class ParallelSection:
    """Megatron parallel layout (names as in megatron-core's ``TransformerConfig``)."""

    tensor_model_parallel_size: int = 1
    """TP: ranks each layer's weights (and the vocabulary) are split over."""
    pipeline_model_parallel_size: int = 1
    """PP: pipeline stages; must divide the layer count."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Interleaved schedule: model chunks per pipeline stage (needs PP > 1; training only)."""
    context_parallel_size: int = 1
    """CP: ranks a sequence is split over; needs Transformer Engine layers and a per-token loss
    (training only)."""
    sequence_parallel: bool = False
    """Split activations along the sequence within the TP group (needs TP > 1; training only)."""
    use_distributed_optimizer: bool | None = None
    """Shard optimizer state over data-parallel ranks; null: on with a GPU, off on CPU (unsupported
    there; training only)."""

    @property
    def model_parallel_size(self) -> int:
        """TP x PP x CP: the ranks that hold one replica."""
        return (
            self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size
        )

    def data_parallel_size(self, world_size: int) -> int:
        """Replicas: world size / model-parallel size (at least 1)."""
        return max(world_size // max(self.model_parallel_size, 1), 1)

    def problems(
        self,
        world_size: int,
        shape: ModelShape | None = None,
        *,
        forward_only: bool = False,
        world: str = "trainer.devices x trainer.num_nodes",
        prefix: str = "parallel",
    ) -> list[str]:
        """Every problem of this layout, each naming the fields that clash.

        Args:
            world_size: processes in the job.
            shape: the model's (layers, heads, query groups), if known (else those checks wait).
            forward_only: a forward pass (``score``): virtual PP, CP, SP and the distributed
                optimizer do not apply and are refused when set.
            world: how the stage's config names the world size (for the message).
            prefix: the section's key.
        """
        tp, pp, cp = (
            self.tensor_model_parallel_size,
            self.pipeline_model_parallel_size,
            self.context_parallel_size,
        )
        out = [
            f"{prefix}.{name}={value}: must be >= 1."
            for name, value in (
                ("tensor_model_parallel_size", tp),
                ("pipeline_model_parallel_size", pp),
                ("context_parallel_size", cp),
            )
            if value < 1
        ]
        if out:
            return out
        mp = self.model_parallel_size
        if world_size >= 1 and world_size % mp:
            out.append(
                f"{world} = {world_size} is not divisible by TP x PP x CP = {mp} "
                f"({prefix}.tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp}, "
                f"context_parallel_size={cp}): change the processes or the parallel sizes."
            )
        vpp = self.virtual_pipeline_model_parallel_size
        if forward_only:
            unused = {
                "virtual_pipeline_model_parallel_size": vpp is not None,
                "context_parallel_size": cp != 1,
                "sequence_parallel": self.sequence_parallel,
                "use_distributed_optimizer": bool(self.use_distributed_optimizer),
            }
            out += [
                f"{prefix}.{name}: a training setting; a forward pass runs at TP x PP (x data parallel): "
                "leave it unset."
                for name, set_ in unused.items()
                if set_
            ]
        if self.sequence_parallel and tp < 2:
            out.append(f"{prefix}.sequence_parallel=true needs tensor_model_parallel_size > 1.")
        if vpp is not None and pp < 2:
            out.append(
                f"{prefix}.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1."
            )
        if shape is not None:
            out += self._shape_problems(shape, prefix)
        return out

    def _shape_problems(self, shape: ModelShape, prefix: str) -> list[str]:
        layers, heads, groups = shape
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        out = []
        if pp > layers:
            out.append(
                f"{prefix}.pipeline_model_parallel_size={pp} > model layers ({layers}): at most one "
                "stage per layer."
            )
        elif layers % pp:
            out.append(
                f"model layers ({layers}) not divisible by {prefix}.pipeline_model_parallel_size={pp}."
            )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and pp >= 2 and pp <= layers and (vpp < 1 or (layers // pp) % vpp):
            out.append(
                f"{prefix}.virtual_pipeline_model_parallel_size={vpp}: must divide the layers per stage "
                f"({layers} // {pp})."
            )
        if heads % tp or groups % tp:
            out.append(
                f"{prefix}.tensor_model_parallel_size={tp} must divide the attention heads ({heads}) and "
                f"query groups ({groups}) of the model."
            )
        return out
