"""Logit parity between a Hugging Face folder and a NeMo 2 checkpoint.

Both sides run the same rows of token ids: the configured prompts, tokenized by the checkpoint's
tokenizer, plus rows of random ids over the whole vocabulary (a prompt touches a few embedding
rows; random rows touch many). One row at a time, no padding, every position compared, logits in
float32. The result is the max and the mean absolute difference over all of them; the check fails
above a tolerance set per parameter dtype (:data:`~nemo_dcod.convert.config.TOLERANCE`).

The NeMo side is loaded without Lightning: the model from the checkpoint's ``context/``, built by
its config's ``configure_model`` under the current Megatron parallel state, and its weights read
with ``megatron.core.dist_checkpointing`` from ``weights/`` (which reshards any saved TP/PP to the
current one). So the same code runs in one process at TP = 1 and in every rank of a TP > 1 gloo
group (:func:`nemo_logits` gathers the vocabulary shards). Only the models' forward runs: no
optimizer, no data pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_dcod.convert.config import TOLERANCE, VerifySection

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
    "verification_rows",
]


class VerificationError(RuntimeError):
    """The two sides of a conversion disagree beyond the tolerance."""


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` | ``bf16`` | ``fp16`` (the keys of :data:`TOLERANCE`)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


@dataclass
class Comparison:
    """Max / mean |logit difference| of two models over the same rows."""

    max_abs: float
    mean_abs: float
    tolerance: float
    dtype: str
    rows: int
    tokens: int
    logit_scale: float = 0.0
    """max |logit| of the reference side (bf16 differences grow with it)."""

    @property
    def passed(self) -> bool:
        """Max difference within the tolerance (and finite)."""
        return bool(self.max_abs <= self.tolerance)

    def describe(self, what: str) -> str:
        """One line for the console."""
        verdict = "ok" if self.passed else "FAILED"
        return (
            f"verify {what}: max |dlogit| {self.max_abs:.3e}, mean {self.mean_abs:.3e} over "
            f"{self.rows} rows / {self.tokens} tokens (logits up to {self.logit_scale:.3g}; "
            f"{self.dtype}, tolerance {self.tolerance:g}): {verdict}"
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-able record."""
        return {
            "max_abs_logit_diff": self.max_abs,
            "mean_abs_logit_diff": self.mean_abs,
            "tolerance": self.tolerance,
            "dtype": self.dtype,
            "rows": self.rows,
            "tokens": self.tokens,
            "logit_scale": self.logit_scale,
            "passed": self.passed,
        }

    def check(self, what: str = "") -> None:
        """Raise :class:`VerificationError` if the difference is above the tolerance."""
        if not self.passed:
            raise VerificationError(
                self.describe(what)
                + ". The converted model does not compute what the source computes; nothing was written. "
                "(verify.tolerance=... sets the bound; --no-verify skips the check.)"
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


def compare_logits(
    reference: Sequence[torch.Tensor],
    other: Sequence[torch.Tensor],
    dtype: torch.dtype,
    tolerance: float | None,
) -> Comparison:
    """Compare per-row ``[S, V]`` logits (other may carry padded vocabulary columns: ignored)."""
    diffs = []
    for ref, oth in zip(reference, other, strict=True):
        vocab = ref.shape[-1]
        diffs.append((ref.double() - oth[..., :vocab].double()).abs().flatten())
    diff = torch.cat(diffs)
    max_abs = float(diff.max()) if torch.isfinite(diff).all() else float("inf")
    name = dtype_name(dtype)
    return Comparison(
        max_abs=max_abs,
        mean_abs=float(diff.mean()),
        tolerance=TOLERANCE[name] if tolerance is None else tolerance,
        dtype=name,
        rows=len(reference),
        tokens=sum(int(r.shape[0]) for r in reference),
        logit_scale=max(float(r.abs().max()) for r in reference),
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
def megatron_parallel(tensor_model_parallel_size: int = 1, seed: int = 1234) -> Iterator[None]:
    """Megatron's parallel state for a forward pass, in this process (and its gloo group).

    Starts a one-process gloo group if none exists (and ends it afterwards); seeds the
    model-parallel RNG tracker, which attention reads even without dropout. Call
    :func:`~nemo_dcod.parallel.cpu_mode.enable_cpu_mode` first on a machine without CUDA.
    """
    from megatron.core import parallel_state, tensor_parallel

    created = not dist.is_initialized()
    if created:
        # An in-memory store: a TCP store leaves a server thread behind, and a process forked
        # later (the tests' gloo workers) could inherit one of its locks held.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_model_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


def load_nemo_model(checkpoint: Path, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """The Megatron model of a NeMo 2 checkpoint, weights loaded, under the current parallel state.

    Args:
        checkpoint: the NeMo 2 checkpoint folder.
        dtype: parameter dtype to build the model in (the stored values are converted on load,
            exactly when widening bf16/fp16 to fp32); ``None``: the checkpoint's.

    Returns:
        ``(mcore_model, nemo_model)``: the ``MCoreGPTModel`` (eval mode) and the NeMo
        LightningModule from ``context/`` (its config and tokenizer; no weights of its own).
    """
    from megatron.core import dist_checkpointing, parallel_state
    from nemo.lightning import io

    nemo_model = io.load_context(str(checkpoint), subpath="model")
    config = nemo_model.config
    config.tensor_model_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    config.pipeline_model_parallel_size = 1
    config.virtual_pipeline_model_parallel_size = None
    config.context_parallel_size = 1
    config.sequence_parallel = False
    config.perform_initialization = False  # the weights come from the checkpoint
    config.use_cpu_initialization = not torch.cuda.is_available()
    if dtype is not None:
        config.params_dtype = dtype
        config.bf16 = dtype == torch.bfloat16
        config.fp16 = dtype == torch.float16
    mcore = config.configure_model(nemo_model.tokenizer)
    # NeMo 2 stores the model under "module." (MegatronParallel's prefix for one model chunk).
    sharded = mcore.sharded_state_dict(prefix="module.")
    loaded = dist_checkpointing.load(sharded, str(Path(checkpoint) / "weights"))
    # The result also holds common.pt's entries (step counters, ...): keep the model's.
    state = {k.removeprefix("module."): loaded[k] for k in sharded}
    mcore.load_state_dict(state, strict=True)
    if dtype is not None:
        mcore.to(dtype)  # norms of the local spec are built in fp32 whatever params_dtype says
    mcore.eval()
    return mcore, nemo_model


@torch.no_grad()
def nemo_logits(mcore: Any, rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[S, V_padded]`` float32 logits of a Megatron GPT model per row, vocabulary shards gathered."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    world = parallel_state.get_tensor_model_parallel_world_size()
    out = []
    for row in rows:
        ids = row[None]
        positions = torch.arange(ids.shape[1], dtype=torch.long)[None]
        logits = mcore(input_ids=ids, position_ids=positions, attention_mask=None)[0].float()
        if world > 1:
            shards = [torch.empty_like(logits) for _ in range(world)]
            dist.all_gather(shards, logits.contiguous(), group=group)
            logits = torch.cat(shards, dim=-1)
        out.append(logits)
    return out


def compare_hf_nemo(
    hf_dir: Path, nemo_checkpoint: Path, settings: VerifySection, hf_model: Any = None
) -> Comparison:
    """Logits of the HF folder vs the NeMo checkpoint, in this process at TP = 1.

    The HF model is run and freed before the NeMo one is built: one model in memory at a time.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    compute = torch.float32 if settings.dtype == "fp32" else None
    model = hf_model
    if model is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=compute or "auto")
    elif compute is not None:
        model = model.to(compute)
    rows = verification_rows(tokenizer, settings, min(len(tokenizer), model.config.vocab_size))
    reference = hf_logits(model, rows)
    del model
    with megatron_parallel(1):
        mcore, nemo_model = load_nemo_model(nemo_checkpoint, compute)
        dtype = compute or nemo_model.config.params_dtype
        logits = nemo_logits(mcore, rows)
        del mcore
    return compare_logits(reference, logits, dtype, settings.tolerance)


def compare_nemo_nemo(reference: Path, other: Path, settings: VerifySection) -> Comparison:
    """Logits of two NeMo checkpoints (e.g. a training checkpoint and its plain export), TP = 1.

    Rows are tokenized with ``other``'s tokenizer; one model in memory at a time.
    """
    from nemo.lightning import io

    tokenizer = io.load_context(str(other), subpath="model").tokenizer
    hf_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    compute = torch.float32 if settings.dtype == "fp32" else None
    results: list[list[torch.Tensor]] = []
    dtype = torch.float32
    for path in (reference, other):
        with megatron_parallel(1):
            mcore, nemo_model = load_nemo_model(path, compute)
            if not results:
                vocab = min(len(hf_tokenizer), int(nemo_model.config.vocab_size))
                rows = verification_rows(hf_tokenizer, settings, vocab)
            dtype = compute or nemo_model.config.params_dtype
            results.append(nemo_logits(mcore, rows))
            del mcore
    return compare_logits(results[0], results[1], dtype, settings.tolerance)
