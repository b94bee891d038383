"""The ``score`` stage's schema: a NeMo 2 checkpoint and a packed store in, teacher columns out.

    cfg = load_config(ScoreConfig, "conf/score_tiny.yaml", ["parallel.tensor_model_parallel_size=2"])

Nothing heavy is imported with it (torch only to ask for a GPU, NeMo never): validating is
instant. :meth:`ScoreConfig.problems` checks what is known without reading the checkpoint; the
store and the checkpoint are checked when the stage runs, with errors that name them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemo_dcod.config import choice_problems
from nemo_dcod.parallel.layout import LaunchSection, ParallelSection

__all__ = ["ScoreConfig", "ScoreLaunchSection"]


@dataclass
class ScoreLaunchSection(LaunchSection):
    """The job's processes (the keys every Megatron stage shares) and the batch size."""

    micro_batch_size: int = 1
    """Store rows per forward pass on one data-parallel replica."""
    micro_batches_per_call: int = 16
    """Micro-batches collated and run per forward-only schedule call: bounds host and device
    memory (each row's attention mask is S² bytes); at least PP keeps the pipeline full."""


@dataclass
class ScoreConfig:
    """``nemo-dcod score``: per-token log-probs (and top-k) of the traces under a model, into the store."""

    checkpoint: str = ""
    """The NeMo 2 checkpoint to score with (`nemo-dcod import` makes one from Hugging Face; a
    training checkpoint works too). A training run's `checkpoints/` folder: its newest complete one."""
    store: str = "data/store"
    """The packed store of `nemo-dcod prepare` (its out_dir); the columns are written into it."""
    what: str = field(default="teacher", metadata={"choices": ("teacher", "reference")})
    """teacher: the model that wrote the traces; reference: the student's initial checkpoint, as the
    proposal when teacher log-probs are unavailable (the iw-SFT proxy). Both fill teacher_logprobs,
    the column the loss reads as p; the manifest records which it is."""
    topk: int = 0
    """Also store each position's top-k (ids, log-probs) over the real vocabulary (the kl/todi
    losses and DisCorD's kl base read them); 0: the trace tokens' log-probs only."""
    tokenizer: str | None = None
    """The scored model's Hugging Face tokenizer directory, for a checkpoint that carries none (one
    trained from scratch by `nemo-dcod train`); null: the checkpoint's own."""
    dtype: str = field(default="fp32", metadata={"choices": ("fp32", "bf16", "checkpoint")})
    """Parameter dtype of the forward pass (log-probs are always computed and stored in fp32);
    checkpoint: the dtype the checkpoint was saved in. bf16 needs a GPU."""
    chunk_size: int | None = None
    """Tokens per chunk of the vocab-parallel log-softmax (bounds its fp32 buffer); null: one chunk."""
    spec: str = field(default="auto", metadata={"choices": ("auto", "local", "te")})
    """Layer implementation: te (Transformer Engine: fused attention over packed rows as THD, GPU),
    local (megatron-core's layers, a dense block-diagonal mask, unfused attention: slower), auto
    (te where it imports)."""
    overwrite: bool = False
    """Replace teacher columns the store already has from elsewhere (the generation engine's
    log-probs, or another model or settings); otherwise that is an error."""
    seed: int = 1234
    """Seed of Megatron's RNG tracker (nothing is random in a forward pass without dropout)."""
    parallel: ParallelSection = field(default_factory=ParallelSection)
    """The scored model's layout: any layout works with any checkpoint (distributed checkpointing
    reshards the stored weights); data parallelism is what is left, world size / (TP x PP)
    replicas, each scoring its own shards."""
    trainer: ScoreLaunchSection = field(default_factory=ScoreLaunchSection)

    @property
    def world_size(self) -> int:
        """Processes in the job."""
        return self.trainer.world_size

    @property
    def data_parallel_size(self) -> int:
        """Replicas of the model, each scoring a disjoint set of shards."""
        return self.parallel.data_parallel_size(self.world_size)

    def problems(self, has_gpu: bool | None = None) -> list[str]:
        """Every problem of this config, each naming the field and how to fix it.

        Args:
            has_gpu: validate as for a machine with (True) or without (False) a GPU; None: this one.
        """
        out = choice_problems(self)
        if not self.checkpoint:
            out.append("checkpoint: set the NeMo 2 checkpoint to score with (`nemo-dcod import` makes one).")
        if not self.store:
            out.append("store: set the packed store directory (prepare's out_dir).")
        t = self.trainer
        out.extend(t.launch_problems("trainer"))
        sizes = {
            "trainer.micro_batch_size": t.micro_batch_size,
            "trainer.micro_batches_per_call": t.micro_batches_per_call,
        }
        out.extend(f"{k}={v}: must be >= 1." for k, v in sizes.items() if v < 1)
        out.extend(self.parallel.problems(self.world_size, forward_only=True))
        if self.topk < 0:
            out.append(f"topk={self.topk}: must be >= 0 (0: no top-k).")
        if self.chunk_size is not None and self.chunk_size < 1:
            out.append(f"chunk_size={self.chunk_size}: must be >= 1, or null for one chunk.")
        if has_gpu is None:
            import importlib.util

            has_gpu = False
            if importlib.util.find_spec("torch") is not None:
                import torch

                has_gpu = torch.cuda.is_available()
        if self.dtype == "bf16" and not has_gpu:
            out.append("dtype=bf16: needs a GPU (this machine has none); use fp32.")
        if self.spec == "te" and not has_gpu:
            out.append(
                "spec=te: Transformer Engine needs a GPU (this machine has none); use spec=local or auto."
            )
        return out

    def content_settings(self) -> dict[str, Any]:
        """The settings that change what is written (not where, how fast, or in which layout)."""
        return {"what": self.what, "topk": self.topk, "dtype": self.dtype}
