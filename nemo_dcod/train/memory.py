"""Per-GPU memory estimate of a parallel layout, printed before a job asks a cluster for GPUs.

A 70B teacher or an 8B student at 8k tokens either fits an 80 GB H100 in a given layout or dies
with an out-of-memory error minutes into the job, after the queue wait. This module gives the
number first, from the architecture and the layout alone (no GPU, no weights):

* **Parameters per rank** are exact: the largest pipeline stage's share after tensor-parallel
  splitting (embedding and output layer split over the vocabulary, QKV / FC1 over heads / width,
  norms replicated). A test checks them against the parameter count of a megatron-core model.
* **Weights, gradients, optimizer state**: Megatron's mixed precision keeps bf16 weights, fp32
  gradient buffers and, in Adam, fp32 master weights + two moments: 2 + 4 + 12 bytes per
  parameter; the distributed optimizer splits the 12 over data-parallel ranks (its docs' "6 + 12/d").
  fp32 training: 4 + 4 + 8.
* **Activations** follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", §4), generalised to grouped-query attention and a gated MLP: per layer and
  micro-batch, the tensors saved for backward, divided by TP where tensor/sequence parallelism
  splits them, with the ``5·a·s²·b`` attention-score term only without a fused (flash) kernel.
  The first pipeline stage holds the most micro-batches in flight: ``PP`` under 1F1B, times
  ``1 + (PP - 1) / (PP · VPP)`` with interleaving (Megatron-LM's ``theoretical_memory_usage``).
* **Logits**: the output layer's ``[s, b, V/TP]`` activation plus the loss's fp32 work space
  (a chunk of rows at a time with ``loss.chunk_size``).

What it leaves out, and why a margin is kept (:data:`H100_USABLE_GIB`): the CUDA context and
NCCL buffers (1-3 GiB), allocator fragmentation, Transformer Engine's FP8 weight copies and
workspaces. It is an estimate to choose a layout with, not a guarantee: measure with
``torch.cuda.max_memory_allocated`` on the first steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "H100_USABLE_GIB",
    "USABLE_GIB_ENV",
    "Architecture",
    "Layout",
    "MemoryEstimate",
    "forward_memory",
    "layers_per_stage",
    "parameters_per_rank",
    "report_fit",
    "train_estimate",
    "train_memory",
    "usable_gib",
]

GIB = 1024**3
H100_USABLE_GIB = 72.0
"""Of an 80 GB H100's 79.6 GiB: what a layout may plan for, leaving the context, NCCL and fragmentation."""
USABLE_GIB_ENV = "DCOD_GPU_MEMORY_GIB"
"""Environment variable overriding :data:`H100_USABLE_GIB` in dry runs (e.g. 130 for an H200)."""


def usable_gib() -> float:
    """GiB per GPU a dry run plans for: ``$DCOD_GPU_MEMORY_GIB``, else :data:`H100_USABLE_GIB`."""
    import os

    value = os.environ.get(USABLE_GIB_ENV)
    try:
        return float(value) if value else H100_USABLE_GIB
    except ValueError:
        raise ValueError(
            f"{USABLE_GIB_ENV}={value!r}: expected GiB per GPU, e.g. 72 (H100 80GB) or 130 (H200)."
        ) from None


@dataclass(frozen=True)
class Architecture:
    """The shape of a GPT model, as megatron-core's ``TransformerConfig`` names it."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    padded_vocab_size: int
    gated_linear_unit: bool = True
    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    qk_layernorm: bool = False
    share_embeddings_and_output_weights: bool = False
    layernorm_has_bias: bool = False
    """LayerNorm (bias) vs RMSNorm (none)."""

    @classmethod
    def of(cls, config: Any, padded_vocab_size: int | None = None) -> Architecture:
        """From a NeMo / megatron-core ``GPTConfig`` (an instance, or any object with its fields)."""
        heads = int(config.num_attention_heads)
        groups = getattr(config, "num_query_groups", None) or heads
        kv = getattr(config, "kv_channels", None) or int(config.hidden_size) // heads
        vocab = padded_vocab_size or getattr(config, "vocab_size", None)
        if not vocab:
            raise ValueError("Architecture.of: the config has no vocab_size; pass padded_vocab_size.")
        return cls(
            num_layers=int(config.num_layers),
            hidden_size=int(config.hidden_size),
            ffn_hidden_size=int(config.ffn_hidden_size),
            num_attention_heads=heads,
            num_query_groups=int(groups),
            kv_channels=int(kv),
            padded_vocab_size=int(vocab),
            gated_linear_unit=bool(getattr(config, "gated_linear_unit", False)),
            add_qkv_bias=bool(getattr(config, "add_qkv_bias", False)),
            add_bias_linear=bool(getattr(config, "add_bias_linear", False)),
            qk_layernorm=bool(getattr(config, "qk_layernorm", False)),
            share_embeddings_and_output_weights=bool(
                getattr(config, "share_embeddings_and_output_weights", False)
            ),
            layernorm_has_bias=getattr(config, "normalization", "RMSNorm") == "LayerNorm",
        )

    def layer_parameters(self, tp: int) -> int:
        """Parameters of one transformer layer on one tensor-parallel rank."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        qkv_out = (self.num_attention_heads + 2 * self.num_query_groups) * d
        norm = h * (2 if self.layernorm_has_bias else 1)
        split = h * qkv_out + self.num_attention_heads * d * h  # QKV (column) + projection (row)
        split += h * f * (2 if self.gated_linear_unit else 1) + f * h  # FC1 (column) + FC2 (row)
        if self.add_qkv_bias or self.add_bias_linear:
            split += qkv_out
        if self.add_bias_linear:
            split += f * (2 if self.gated_linear_unit else 1)
        replicated = 2 * norm  # pre-attention and pre-MLP norms
        if self.add_bias_linear:
            replicated += 2 * h  # row-parallel biases are added after the all-reduce
        if self.qk_layernorm:
            replicated += 2 * d * (2 if self.layernorm_has_bias else 1)
        return split // tp + replicated

    def total_parameters(self) -> int:
        """Parameters of the whole model (padded vocabulary included)."""
        return parameters_per_rank(self, 1, 1, 0)


def layers_per_stage(num_layers: int, pp: int) -> list[int]:
    """Transformer layers on each pipeline stage (megatron-core splits evenly; PP divides layers)."""
    return [num_layers // pp + (1 if s < num_layers % pp else 0) for s in range(pp)]


def parameters_per_rank(arch: Architecture, tp: int, pp: int, stage: int) -> int:
    """Parameters held by one rank of pipeline stage ``stage`` (tensor-parallel shard).

    The first stage holds the embedding, the last the final norm and the output layer; with tied
    weights and ``pp == 1`` they are one tensor (with ``pp > 1`` Megatron keeps a copy on the last
    stage and all-reduces its gradient with the first).
    """
    h = arch.hidden_size
    vocab_shard = arch.padded_vocab_size // tp * h
    count = layers_per_stage(arch.num_layers, pp)[stage] * arch.layer_parameters(tp)
    if stage == 0:
        count += vocab_shard
    if stage == pp - 1:
        count += h * (2 if arch.layernorm_has_bias else 1)
        if not (arch.share_embeddings_and_output_weights and pp == 1):
            count += vocab_shard
    return count


@dataclass(frozen=True)
class Layout:
    """How a job runs the model: parallel sizes, batch, precision."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    data_parallel_size: int = 1
    sequence_parallel: bool = False
    seq_length: int = 4096
    micro_batch_size: int = 1
    num_microbatches: int = 1
    """Micro-batches per step and data-parallel rank (global batch / (micro batch x DP))."""
    bf16: bool = True
    distributed_optimizer: bool = False
    fused_attention: bool = True
    """Flash / cuDNN attention (Transformer Engine): no ``[s, s]`` score tensors are stored."""
    loss_chunk_rows: int | None = None
    """Rows of logits the loss works on at a time (``loss.chunk_size``); None: all."""
    resident_mask_rows: int = 0
    """Rows whose dense ``[S, S]`` attention mask (1 byte each) sits on the device at once
    (``score`` collates a window of micro-batches; training keeps each in-flight micro-batch's)."""


@dataclass
class MemoryEstimate:
    """Bytes per GPU on the most loaded rank, by kind."""

    what: str
    parameters: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        """Everything above, in bytes."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def fits(self, usable: float = H100_USABLE_GIB) -> bool:
        """Whether the total stays within ``usable`` GiB."""
        return self.total <= usable * GIB

    def describe(self, usable: float = H100_USABLE_GIB) -> str:
        """A few lines for the console."""
        parts = ("weights", "gradients", "optimizer", "activations", "logits")
        body = ", ".join(f"{p} {getattr(self, p) / GIB:.1f}" for p in parts if getattr(self, p))
        verdict = "fits" if self.fits(usable) else "DOES NOT FIT"
        return (
            f"memory estimate per GPU ({self.what}): {self.total / GIB:.1f} GiB "
            f"[{body}] for {self.parameters / 1e9:.2f}B parameters on the largest rank; "
            f"{verdict} in {usable:g} GiB per GPU"
            + (" (an 80 GB H100 less context, NCCL and fragmentation)" if usable == H100_USABLE_GIB else "")
        )


def _layer_activation_bytes(arch: Architecture, layout: Layout) -> float:
    """Bytes one layer keeps for backward per micro-batch; also about its forward working set."""
    tp, cp = layout.tensor_model_parallel_size, layout.context_parallel_size
    s, b = layout.seq_length / cp, layout.micro_batch_size
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.kv_channels
    a, g = arch.num_attention_heads, arch.num_query_groups
    e = 2 if layout.bf16 else 4  # bytes of an activation element
    sp = tp if layout.sequence_parallel else 1
    # Hidden-width tensors that only sequence parallelism splits (Korthikanti's "10 sbh" in bf16):
    # the two norm inputs, the QKV and FC1 inputs (the norms' outputs, replicated over TP without
    # SP), and the two residual dropout masks (1 byte each).
    unsplit = s * b * h * (4 * e + 2) / sp
    qkv = s * b * (a + 2 * g) * d * e  # Q, K, V saved for the attention backward
    attention = qkv + s * b * a * d * e  # QKV, the context (the projection's input)
    fc1_out = s * b * f * (2 if arch.gated_linear_unit else 1)
    mlp = fc1_out * e + s * b * f * e  # FC1 output, the activation's output (FC2's input)
    split = attention + mlp
    if not layout.fused_attention:
        split += 5 * a * s * s * b * (e / 2)  # scores, softmax (2 B each in bf16), dropout mask
    return unsplit + split / tp


def _logit_bytes(arch: Architecture, layout: Layout, *, training: bool) -> float:
    tp, cp = layout.tensor_model_parallel_size, layout.context_parallel_size
    rows = layout.seq_length / cp * layout.micro_batch_size
    shard = arch.padded_vocab_size / tp
    chunk = min(rows, layout.loss_chunk_rows or rows)
    stored = rows * shard * (2 if layout.bf16 else 4)  # the output layer's logits, kept for backward
    work = chunk * shard * 4 * (2 if training else 1)  # fp32 log-softmax (+ its gradient)
    return stored + work


def train_memory(arch: Architecture, layout: Layout) -> MemoryEstimate:
    """Per-GPU memory of training ``arch`` in ``layout`` with Megatron's Adam (see the module doc).

    Each pipeline stage is estimated on its own (the first holds the embedding and the most
    micro-batches in flight, the last the output layer and the logits); the result is the stage
    with the largest total.
    """
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    weight_bytes, grad_bytes, optim_bytes = (2, 4, 12) if layout.bf16 else (4, 4, 8)
    if layout.distributed_optimizer:
        optim_bytes /= layout.data_parallel_size  # type: ignore[assignment]
    e = 2 if layout.bf16 else 4
    embedding_out = (
        layout.seq_length / layout.context_parallel_size * layout.micro_batch_size * arch.hidden_size
    )
    per_layer = _layer_activation_bytes(arch, layout)
    # Dense [S, S] masks (1 byte a position), one per in-flight micro-batch, shared by the layers.
    mask_bytes = layout.resident_mask_rows * layout.seq_length**2
    vpp = layout.virtual_pipeline_model_parallel_size
    stages = []
    for stage, layers in enumerate(layers_per_stage(arch.num_layers, pp)):
        # 1F1B: stage i holds the activations of PP - i micro-batches at its peak; interleaving
        # adds (PP - 1) / (PP x VPP) of a stage's worth (Megatron-LM's theoretical memory).
        in_flight: float = min(pp - stage, layout.num_microbatches)
        if vpp and pp > 1:
            in_flight *= 1 + (pp - 1) / (pp * vpp)
        params = parameters_per_rank(arch, tp, pp, stage)
        stages.append(
            MemoryEstimate(
                what=f"training, TP={tp} PP={pp} CP={layout.context_parallel_size} "
                f"DP={layout.data_parallel_size}" + (f", stage {stage}" if pp > 1 else ""),
                parameters=params,
                weights=params * weight_bytes,
                gradients=params * grad_bytes,
                optimizer=params * optim_bytes,
                activations=in_flight * (layers * per_layer + (embedding_out * e if stage == 0 else 0.0))
                + mask_bytes,
                logits=_logit_bytes(arch, layout, training=True) if stage == pp - 1 else 0.0,
            )
        )
    return max(stages, key=lambda estimate: estimate.total)


def forward_memory(arch: Architecture, layout: Layout) -> MemoryEstimate:
    """Per-GPU memory of a forward-only pass (``score``): weights, one layer's working set, logits."""
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    params = max(parameters_per_rank(arch, tp, pp, stage) for stage in range(pp))
    return MemoryEstimate(
        what=f"forward only, TP={tp} PP={pp} DP={layout.data_parallel_size}",
        parameters=params,
        weights=params * (2 if layout.bf16 else 4),
        gradients=0.0,
        optimizer=0.0,
        # Nothing is kept across layers without a backward: one layer's working set at a time,
        # plus the collated window's attention masks.
        activations=_layer_activation_bytes(arch, layout) + layout.resident_mask_rows * layout.seq_length**2,
        logits=_logit_bytes(arch, layout, training=False),
    )


def train_estimate(cfg: Any, gpt_config: Any, attention: str | None, te: bool) -> MemoryEstimate:
    """:func:`train_memory` of a :class:`~nemo_dcod.train.config.TrainConfig` and its ``GPTConfig``.

    Args:
        cfg: the training config.
        gpt_config: its ``GPTConfig`` (the architecture; ``seq_length`` is the rows' length as the
            model sees them, padded for THD).
        attention: the store's attention form (``dense_mask``: a resident ``[S, S]`` mask per
            micro-batch in flight; ``thd`` / ``causal``: none); None for the synthetic source.
        te: Transformer Engine layers (flash / cuDNN attention) or the local spec (unfused).
    """
    p, t = cfg.parallel, cfg.trainer
    dp = cfg.data_parallel_size
    micro_batches = max(1, t.global_batch_size // (t.micro_batch_size * dp))
    in_flight = min(p.pipeline_model_parallel_size, micro_batches)
    layout = Layout(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        data_parallel_size=dp,
        sequence_parallel=p.sequence_parallel,
        seq_length=int(gpt_config.seq_length),
        micro_batch_size=t.micro_batch_size,
        num_microbatches=micro_batches,
        bf16=cfg.precision.dtype == "bf16",
        distributed_optimizer=cfg.use_distributed_optimizer,
        # Transformer Engine: flash / cuDNN attention, no [s, s] scores; the local spec: the
        # unfused softmax (and the dense mask, for packed rows).
        fused_attention=te,
        loss_chunk_rows=cfg.loss.get("chunk_size"),
        resident_mask_rows=in_flight * t.micro_batch_size if attention == "dense_mask" else 0,
    )
    return train_memory(Architecture.of(gpt_config), layout)


def report_fit(stage: str, layout: str, estimate: MemoryEstimate, advice: str) -> int:
    """Print a dry run's layout line and estimate; 0, or 1 (with what to change) when it does not fit.

    Raises:
        ConfigError: an unreadable :data:`USABLE_GIB_ENV`.
    """
    from nemo_dcod.config import ConfigError

    try:
        usable = usable_gib()
    except ValueError as exc:
        raise ConfigError([str(exc)], "environment") from None
    print(f"{stage}: {layout}: config ok")
    print(estimate.describe(usable))
    if estimate.fits(usable):
        return 0
    print(f"{stage}: change the layout ({advice}) or set {USABLE_GIB_ENV} for GPUs with more memory.")
    return 1
