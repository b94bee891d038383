"""Logit parity between a Hugging Face folder and a NeMo 2 checkpoint.

Both sides run the same rows of token ids: the configured prompts, tokenized by the checkpoint's
tokenizer, plus rows of random ids over the whole vocabulary (a prompt touches a few embedding
rows; random rows touch many). One row at a time, no padding, every position compared, logits in
float32. The result is the max and the mean absolute difference over all of them. Computing in
fp32 the check fails above :data:`~nemo_dcod.convert.config.TOLERANCE` (1e-4); computing in
bf16/fp16 (``verify.dtype=checkpoint``) the reference also runs in fp32 and the other side's error
against those exact logits must stay within a factor of the reference's own low-precision error
(:data:`~nemo_dcod.convert.config.LOW_PRECISION_FACTORS`: no fixed bound fits every model size).

The NeMo side is loaded without Lightning: the model from the checkpoint's ``context/``, built by
its config's ``configure_model`` under the current Megatron parallel state, and its weights read
with ``megatron.core.dist_checkpointing`` from ``weights/`` (which reshards any saved TP/PP to the
current one). So the same code runs in one process at TP = 1 and in every rank of a TP x PP gloo
group: :func:`nemo_logits` gathers the vocabulary shards, and with pipeline stages it runs
Megatron's own forward-only schedule (:func:`pipeline_forward`), whose last stage returns the
logits. Only the models' forward runs: no optimizer, no data pipeline, no gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_dcod.convert.config import LOW_PRECISION_FACTORS, TOLERANCE, VerifySection

__all__ = [
    "Comparison",
    "VerificationError",
    "compare_hf_nemo",
    "compare_logits",
    "compare_nemo_nemo",
    "dtype_name",
    "hf_logits",
    "load_nemo_model",
    "megatron_parallel",
    "nemo_logits",
    "pipeline_forward",
    "verification_rows",
]


class VerificationError(RuntimeError):
    """The two sides of a conversion disagree beyond the tolerance."""


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` | ``bf16`` | ``fp16`` (the keys of :data:`TOLERANCE`)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


@dataclass
class Comparison:
    """Max / mean |logit difference| of two models over the same rows.

    In fp32 (or with an explicit ``verify.tolerance``) the check is ``max_abs <= tolerance``. In
    bf16/fp16 the reference side also ran in fp32 (the exact logits of its weights), and the check
    is relative (:data:`~nemo_dcod.convert.config.LOW_PRECISION_FACTORS`): the other side's error
    against those fp32 logits (``error_max``, ``error_mean``) within a factor of the reference's
    own low-precision error (``reference_error_max``, ``reference_error_mean``).
    """

    max_abs: float
    mean_abs: float
    tolerance: float | None
    """Bound on ``max_abs``; None: the relative low-precision bound."""
    dtype: str
    rows: int
    tokens: int
    logit_scale: float = 0.0
    """max |logit| of the reference side (bf16 differences grow with it)."""
    reference_error_max: float | None = None
    reference_error_mean: float | None = None
    error_max: float | None = None
    error_mean: float | None = None

    @property
    def relative(self) -> bool:
        """Whether the relative low-precision bound applies."""
        return self.tolerance is None and self.reference_error_max is not None

    def ratios(self) -> tuple[float, float]:
        """(max, mean) of the other side's error over the reference's own (relative bound only)."""
        assert self.relative and self.error_max is not None and self.error_mean is not None
        assert self.reference_error_max is not None and self.reference_error_mean is not None

        def ratio(err: float, ref: float) -> float:
            if ref > 0:
                return err / ref
            return 0.0 if err == 0 else float("inf")

        return ratio(self.error_max, self.reference_error_max), ratio(
            self.error_mean, self.reference_error_mean
        )

    @property
    def passed(self) -> bool:
        """Within the bound (and finite)."""
        if not self.relative:
            return self.tolerance is not None and bool(self.max_abs <= self.tolerance)
        r_max, r_mean = self.ratios()
        return bool(r_max <= LOW_PRECISION_FACTORS["max"] and r_mean <= LOW_PRECISION_FACTORS["mean"])

    def describe(self, what: str) -> str:
        """One line for the console."""
        verdict = "ok" if self.passed else "FAILED"
        head = (
            f"verify {what}: max |dlogit| {self.max_abs:.3e}, mean {self.mean_abs:.3e} over "
            f"{self.rows} rows / {self.tokens} tokens (logits up to {self.logit_scale:.3g}; {self.dtype}"
        )
        if not self.relative:
            return f"{head}, tolerance {self.tolerance:g}): {verdict}"
        r_max, r_mean = self.ratios()
        return (
            f"{head}); against the reference's fp32 logits: max {self.error_max:.3e}, mean "
            f"{self.error_mean:.3e}, the reference's own {self.dtype} error max "
            f"{self.reference_error_max:.3e}, mean {self.reference_error_mean:.3e} (ratios {r_max:.2f} <= "
            f"{LOW_PRECISION_FACTORS['max']:g}, {r_mean:.2f} <= {LOW_PRECISION_FACTORS['mean']:g}): {verdict}"
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-able record."""
        out: dict[str, Any] = {
            "max_abs_logit_diff": self.max_abs,
            "mean_abs_logit_diff": self.mean_abs,
            "tolerance": self.tolerance,
            "dtype": self.dtype,
            "rows": self.rows,
            "tokens": self.tokens,
            "logit_scale": self.logit_scale,
            "passed": self.passed,
        }
        if self.reference_error_max is not None:
            out["vs_reference_fp32"] = {
                "max_abs_logit_diff": self.error_max,
                "mean_abs_logit_diff": self.error_mean,
                "reference_own_max": self.reference_error_max,
                "reference_own_mean": self.reference_error_mean,
                "factors": dict(LOW_PRECISION_FACTORS),
            }
        return out

    def check(self, what: str = "") -> None:
        """Raise :class:`VerificationError` if the difference is above the bound."""
        if not self.passed:
            raise VerificationError(
                self.describe(what)
                + ". The converted model does not compute what the source computes; nothing was written. "
                "(verify.tolerance=... sets an absolute bound; --no-verify skips the check.)"
            )


def verification_rows(tokenizer: Any, settings: VerifySection, vocab_size: int) -> list[torch.Tensor]:
    """``[S_i]`` int64 rows: the tokenized prompts (truncated), then random ids in ``[0, vocab_size)``.

    Args:
        tokenizer: a transformers tokenizer.
        settings: the prompts, number of random rows, length and seed.
        vocab_size: ids of random rows are drawn below it (the tokenizer's size).
    """
    rows = []
    for prompt in settings.prompts:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"][: settings.seq_length]
        if ids:
            rows.append(torch.tensor(ids, dtype=torch.long))
    gen = torch.Generator().manual_seed(settings.seed)
    for _ in range(settings.random_rows):
        rows.append(torch.randint(0, vocab_size, (settings.seq_length,), generator=gen))
    return rows


def _abs_diff(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(max, mean) |reference - other| over every row; other may carry padded vocabulary columns."""
    diffs = []
    for ref, oth in zip(reference, other, strict=True):
        vocab = ref.shape[-1]
        diffs.append((ref.double() - oth[..., :vocab].double()).abs().flatten())
    diff = torch.cat(diffs)
    max_abs = float(diff.max()) if torch.isfinite(diff).all() else float("inf")
    return max_abs, float(diff.mean())


def compare_logits(
    reference: Sequence[torch.Tensor],
    other: Sequence[torch.Tensor],
    dtype: torch.dtype,
    tolerance: float | None,
    reference_fp32: Sequence[torch.Tensor] | None = None,
) -> Comparison:
    """Compare per-row ``[S, V]`` logits (other may carry padded vocabulary columns: ignored).

    Args:
        reference, other: the two sides' logits, computed in ``dtype``.
        dtype: the compute dtype of both sides.
        tolerance: an absolute bound on max |reference - other|; None: 1e-4 in fp32, the relative
            bound in bf16/fp16 (needs ``reference_fp32``).
        reference_fp32: the reference side's logits with its weights upcast to fp32 (bf16/fp16 only).

    Raises:
        ValueError: a low-precision dtype without ``tolerance`` nor ``reference_fp32``.
    """
    max_abs, mean_abs = _abs_diff(reference, other)
    name = dtype_name(dtype)
    extra: dict[str, float] = {}
    if tolerance is None and name != "fp32":
        if reference_fp32 is None:
            raise ValueError(f"compare_logits: {name} without a tolerance needs the reference's fp32 logits.")
        extra["reference_error_max"], extra["reference_error_mean"] = _abs_diff(reference_fp32, reference)
        extra["error_max"], extra["error_mean"] = _abs_diff(reference_fp32, other)
    return Comparison(
        max_abs=max_abs,
        mean_abs=mean_abs,
        tolerance=TOLERANCE["fp32"] if tolerance is None and name == "fp32" else tolerance,
        dtype=name,
        rows=len(reference),
        tokens=sum(int(r.shape[0]) for r in reference),
        logit_scale=max(float(r.abs().max()) for r in reference),
        **extra,
    )


# --------------------------------------------------------------------------- Hugging Face side


@torch.no_grad()
def hf_logits(model: Any, rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[S, V]`` float32 logits of a transformers causal LM (a loaded model or a folder) per row."""
    if isinstance(model, str | Path):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model), torch_dtype="auto")
    model.eval()
    return [model(input_ids=row[None]).logits[0].float() for row in rows]


# --------------------------------------------------------------------------- NeMo side


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
        parallel_state.destroy_model_parallel()
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


def compare_hf_nemo(
    hf_dir: Path,
    nemo_checkpoint: Path,
    settings: VerifySection,
    hf_model: Any = None,
    *,
    nemo_round_to: torch.dtype | None = None,
) -> Comparison:
    """Logits of the HF folder (the reference) vs the NeMo checkpoint, in this process at TP = 1.

    ``settings.dtype``: fp32 (both sides upcast), or checkpoint: both sides in the HF folder's
    dtype, and for bf16/fp16 the HF model once more in fp32 for the relative bound. The HF model
    is run and freed before the NeMo one is built: one model in memory at a time.

    Args:
        hf_dir: the HF folder (config, weights, tokenizer).
        nemo_checkpoint: the NeMo 2 checkpoint.
        settings: rows, compute dtype, tolerance.
        hf_model: the HF model, already loaded (else read from ``hf_dir``).
        nemo_round_to: the HF folder holds the checkpoint's weights rounded to this dtype (an
            export to a narrower dtype): the NeMo side is rounded alike, so the comparison checks
            the conversion, not the rounding.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    fp32 = settings.dtype == "fp32"
    model = hf_model
    if model is None:
        from transformers import AutoModelForCausalLM

        load_as = torch.float32 if fp32 else "auto"
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=load_as)
    elif fp32:
        model = model.to(torch.float32)
    compute: torch.dtype = torch.float32 if fp32 else model.dtype
    rows = verification_rows(tokenizer, settings, min(len(tokenizer), model.config.vocab_size))
    reference = hf_logits(model, rows)
    reference_fp32 = None
    if compute != torch.float32 and settings.tolerance is None:
        reference_fp32 = hf_logits(model.to(torch.float32), rows)  # exact: the same weights, upcast
    del model
    with megatron_parallel(1):
        mcore, _ = load_nemo_model(nemo_checkpoint, compute, round_to=nemo_round_to if fp32 else None)
        logits = nemo_logits(mcore, rows)
        assert logits is not None  # one process: it is the last pipeline stage
        del mcore
    return compare_logits(reference, logits, compute, settings.tolerance, reference_fp32)


def compare_nemo_nemo(reference: Path, other: Path, settings: VerifySection) -> Comparison:
    """Logits of two NeMo checkpoints (e.g. a training checkpoint and its plain export), TP = 1.

    Rows are tokenized with ``other``'s tokenizer; one model in memory at a time. With
    ``settings.dtype=checkpoint`` both run in the reference's dtype (and the reference once more
    in fp32 for the relative bound when that is bf16/fp16).
    """
    from nemo.lightning import io

    tokenizer = io.load_context(str(other), subpath="model").tokenizer
    hf_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    compute: torch.dtype = torch.float32
    if settings.dtype != "fp32":
        compute = io.load_context(str(reference), subpath="model.config").params_dtype
    runs = [(reference, compute), (other, compute)]
    if compute != torch.float32 and settings.tolerance is None:
        runs.append((reference, torch.float32))
    results: list[list[torch.Tensor]] = []
    for path, dtype in runs:
        with megatron_parallel(1):
            mcore, nemo_model = load_nemo_model(path, dtype)
            if not results:
                vocab = min(len(hf_tokenizer), int(nemo_model.config.vocab_size))
                rows = verification_rows(hf_tokenizer, settings, vocab)
            logits = nemo_logits(mcore, rows)
            assert logits is not None  # one process: it is the last pipeline stage
            results.append(logits)
            del mcore
    reference_fp32 = results[2] if len(results) > 2 else None
    return compare_logits(results[0], results[1], compute, settings.tolerance, reference_fp32)
