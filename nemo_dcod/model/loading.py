"""Megatron models of NeMo 2 checkpoints, built and loaded without Lightning; forward-only passes.

Every stage that runs a trained or imported model forward (``score``, import/export verification,
benchmarks) loads it here: the model from the checkpoint's ``context/``, built by its config's
``configure_model`` under the current Megatron parallel state, and its weights read with
``megatron.core.dist_checkpointing`` from ``weights/`` (which reshards any saved TP/PP to the
current one). So the same code runs in one process at TP = 1 and in every rank of a TP x PP gloo
or NCCL group. :func:`pipeline_forward` runs Megatron's own forward-only schedule (the last stage
returns the logits; no optimizer, no gradients); :func:`nemo_logits` gathers the vocabulary shards
of whole rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["load_nemo_model", "megatron_parallel", "nemo_logits", "pipeline_forward"]


@contextlib.contextmanager
def megatron_parallel(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, seed: int = 1234
) -> Iterator[None]:
    """Megatron's parallel state for a forward pass, in this process (and its gloo group).

    Starts a one-process gloo group if none exists (and ends it afterwards); the world size must
    be a multiple of TP x PP (the rest is data parallelism). Seeds the model-parallel RNG tracker,
    which attention reads even without dropout. Call
    :func:`~nemo_dcod.parallel.cpu_mode.enable_cpu_mode` first on a machine without CUDA.
    """
    from megatron.core import parallel_state, tensor_parallel

    from nemo_dcod.parallel.state import destroy_model_parallel

    created = not dist.is_initialized()
    if created:
        # An in-memory store: a TCP store leaves a server thread behind, and a process forked
        # later (the tests' gloo workers) could inherit one of its locks held.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        destroy_model_parallel()
        if created:
            dist.destroy_process_group()


@contextlib.contextmanager
def _tied_embeddings_from_checkpoint() -> Iterator[None]:
    """On CPU, skip the first/last-stage sync of tied embeddings while a model is built.

    With tied input/output embeddings (Qwen) and PP > 1, megatron-core's
    ``LanguageModule.setup_embeddings_and_output_layer`` copies the first stage's embedding to the
    last stage's output layer with ``weight.data.cuda()`` and an all-reduce: a tensor method no
    module-level shim reaches, so it fails without CUDA. Here the copy is not needed: both stages
    load the same stored tensor right after (the last stage's ``output_layer.weight`` is mapped to
    the embedding in the sharded state dict). Nothing changes on a GPU.
    """
    if torch.cuda.is_available():
        yield
        return
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule._is_in_embd_group
    LanguageModule._is_in_embd_group = lambda self: False
    try:
        yield
    finally:
        LanguageModule._is_in_embd_group = original


def load_nemo_model(
    checkpoint: Path,
    dtype: torch.dtype | None = None,
    *,
    local_spec: bool = False,
    round_to: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """The Megatron model of a NeMo 2 checkpoint, weights loaded, under the current parallel state.

    Args:
        checkpoint: the NeMo 2 checkpoint folder.
        dtype: parameter dtype to build the model in (the stored values are converted on load,
            exactly when widening bf16/fp16 to fp32); ``None``: the checkpoint's.
        local_spec: build megatron-core's local layer spec whatever the checkpoint's config says.
            Its attention applies a dense ``attention_mask`` (packed documents kept apart by the
            block-diagonal mask); Transformer Engine's fused attention with the causal mask type
            ignores it. The stored weights load either way (the local spec's sharded state dict
            uses TE's fused-norm names). On a machine without TE the spec is local anyway.
        round_to: round every weight to this dtype (nearest even) and back, after loading: the
            values an export to that dtype holds, computed in ``dtype``.

    Returns:
        ``(mcore_model, nemo_model)``: the ``MCoreGPTModel`` (eval mode) and the NeMo
        LightningModule from ``context/`` (its config and tokenizer; no weights of its own).
    """
    from megatron.core import dist_checkpointing, parallel_state
    from nemo.lightning import io

    nemo_model = io.load_context(str(checkpoint), subpath="model")
    config = nemo_model.config
    config.tensor_model_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    config.pipeline_model_parallel_size = parallel_state.get_pipeline_model_parallel_world_size()
    config.virtual_pipeline_model_parallel_size = None
    config.context_parallel_size = 1
    config.sequence_parallel = False
    config.perform_initialization = False  # the weights come from the checkpoint
    config.use_cpu_initialization = not torch.cuda.is_available()
    if dtype is not None:
        config.params_dtype = dtype
        config.bf16 = dtype == torch.bfloat16
        config.fp16 = dtype == torch.float16
    # What travels between pipeline stages (p2p buffers), and how: one batched exchange per step.
    config.pipeline_dtype = config.params_dtype
    config.batch_p2p_comm, config.overlap_p2p_comm = True, False
    # On CPU the schedule would free a stage's output while a gloo send may still read it
    # (nemo_dcod.model.families explains it for training); forward-only keeps them anyway.
    config.deallocate_pipeline_outputs = False
    if local_spec:
        from nemo_dcod.model.families import use_local_layers

        # The checkpoint's config may come from a TE run, with the masked-softmax fusion on: off,
        # or the fused causal kernel would ignore the packed rows' mask (see use_local_layers).
        use_local_layers(config)
    with _tied_embeddings_from_checkpoint():
        mcore = config.configure_model(nemo_model.tokenizer)
    # NeMo 2 stores the model under "module." (MegatronParallel's prefix for one model chunk).
    sharded = mcore.sharded_state_dict(prefix="module.")
    loaded = dist_checkpointing.load(sharded, str(Path(checkpoint) / "weights"))
    # The result also holds common.pt's entries (step counters, ...): keep the model's.
    state = {k.removeprefix("module."): loaded[k] for k in sharded}
    mcore.load_state_dict(state, strict=True)
    if dtype is not None:
        mcore.to(dtype)  # norms of the local spec are built in fp32 whatever params_dtype says
    if round_to is not None:
        with torch.no_grad():
            for param in mcore.parameters():
                param.copy_(param.to(round_to))
    mcore.eval()
    return mcore, nemo_model


@torch.no_grad()
def pipeline_forward(
    mcore: Any,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    on_logits: Callable[[torch.Tensor, dict[str, torch.Tensor]], Any],
) -> list[Any]:
    """Forward only through Megatron's pipeline schedule; ``on_logits`` runs on the last stage.

    Every rank of the model-parallel group calls this with the same micro-batches (same shapes):
    the first stage embeds ``tokens``, middle stages receive activations over p2p, and on the last
    stage each micro-batch's vocab-parallel logits go to ``on_logits`` (no vocabulary gather, no
    autograd graph, no loss). At PP = 1 the schedule is Megatron's no-pipelining one.

    Args:
        mcore: Megatron ``GPTModel`` built for the current parallel state (eval mode).
        micro_batches: each ``tokens`` and ``position_ids`` ``[B, S]`` int64, optional
            ``attention_mask`` ``[B, 1, S, S]`` bool (True = masked out; None: causal), and any
            other key ``on_logits`` reads. All of one ``B`` and ``S``. With THD metadata
            (``cu_seqlens`` ``[1, N + 1]`` over the ``B·S`` flattened tokens, ``max_seqlen``; for
            Transformer Engine layers) the ``B`` rows run as one packed sequence of ``B·S`` tokens
            and no mask.
        on_logits: ``(logits [B, S, V/TP], micro_batch) -> result``, on the last stage only.

    Returns:
        The results of ``on_logits`` in micro-batch order on the last pipeline stage; ``[]`` on
        the other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    shape = tuple(micro_batches[0]["tokens"].shape)
    if any(tuple(b["tokens"].shape) != shape for b in micro_batches):
        raise ValueError(
            "pipeline_forward: micro-batches of one call must share [B, S] (p2p buffers are sized "
            f"once); got {sorted({tuple(b['tokens'].shape) for b in micro_batches})}."
        )

    from nemo_dcod.model.steps import packed_seq_params

    packed = "cu_seqlens" in micro_batches[0]

    def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: Any) -> Any:
        batch = next(data_iterator)
        params = packed_seq_params(batch) if packed else None
        rows = batch["tokens"].shape
        output = model(
            input_ids=batch["tokens"].reshape(1, -1) if packed else batch["tokens"],
            position_ids=batch["position_ids"].reshape(1, -1) if packed else batch["position_ids"],
            attention_mask=None if packed else batch.get("attention_mask"),
            **({"packed_seq_params": params} if packed else {}),
        )

        def collect(output_tensor: torch.Tensor, non_loss_data: bool = True) -> Any:
            del non_loss_data  # always True: collect_non_loss_data below
            return on_logits(output_tensor.reshape(*rows, -1) if packed else output_tensor, batch)

        return output, collect

    # A THD pack is one sequence of B x S tokens for the schedule (its p2p buffers are [B·S, 1, H]).
    seq_length, micro_batch_size = (shape[0] * shape[1], 1) if packed else (shape[1], shape[0])
    results: list[Any] = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[mcore],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=True,
        collect_non_loss_data=True,  # the last stage's results come back as they are
    )
    return list(results)


@torch.no_grad()
def nemo_logits(mcore: Any, rows: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """``[S, V_padded]`` float32 logits of a Megatron GPT model per row, vocabulary shards gathered.

    Under pipeline parallelism the rows go through :func:`pipeline_forward` (one row per call:
    rows may differ in length) and only the last stage has logits: the other stages return None.
    """
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    world = parallel_state.get_tensor_model_parallel_world_size()

    def gather(logits: torch.Tensor, batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        logits = logits[0].float()
        if world > 1:
            shards = [torch.empty_like(logits) for _ in range(world)]
            dist.all_gather(shards, logits.contiguous(), group=group)
            logits = torch.cat(shards, dim=-1)
        return logits

    pipelined = parallel_state.get_pipeline_model_parallel_world_size() > 1
    out = []
    for row in rows:
        ids = row[None]
        positions = torch.arange(ids.shape[1], dtype=torch.long)[None]
        if pipelined:
            out.extend(pipeline_forward(mcore, [{"tokens": ids, "position_ids": positions}], gather))
        else:
            out.append(gather(mcore(input_ids=ids, position_ids=positions, attention_mask=None)))
    return out if out else None
