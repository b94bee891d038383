"""Logit parity between a Hugging Face folder and a NeMo 2 checkpoint.

Both sides run the same rows of token ids: the configured prompts, tokenized by the checkpoint's
tokenizer, plus rows of random ids over the whole vocabulary (a prompt touches a few embedding
rows; random rows touch many). One row at a time, no padding, every position compared, logits in
float32. The result is the max and the mean absolute difference over all of them. Computing in
fp32 the check fails above a bound that follows what fp32 can promise for that model:
``8 * eps32 * max|logit| * sqrt(layers * hidden)``, at least 1e-4
(:func:`~nemo_dcod.convert.config.fp32_tolerance`; 5.0e-3 for SmolLM2-135M, 1.4e-2 for
Llama-3.1-8B, 3.1e-2 for Llama-3.1-70B at logits up to 40, where a fixed 1e-4 refused correct
conversions of a 135M model already). Computing in bf16/fp16 (``verify.dtype=checkpoint``) the
reference also runs in fp32 and the other side's error against those exact logits must stay within
a factor of the reference's own low-precision error
(:data:`~nemo_dcod.convert.config.LOW_PRECISION_FACTORS`: no fixed bound fits every model size).

The NeMo side is loaded as every stage loads a checkpoint (:mod:`nemo_dcod.model.loading`: no
Lightning; any TP x PP, resharded on load; Megatron's forward-only schedule under pipeline
parallelism). Only the models' forward runs: no optimizer, no data pipeline, no gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_dcod.convert.config import (
    FP32_FACTOR,
    FP32_FLOOR,
    LOW_PRECISION_FACTORS,
    VerifySection,
    fp32_tolerance,
)
from nemo_dcod.model.loading import load_nemo_model, megatron_parallel, nemo_logits

__all__ = [
    "Comparison",
    "VerificationError",
    "compare_hf_nemo",
    "compare_logits",
    "compare_nemo_nemo",
    "dtype_name",
    "hf_logits",
    "verification_rows",
]


class VerificationError(RuntimeError):
    """The two sides of a conversion disagree beyond the tolerance."""


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` | ``bf16`` | ``fp16``."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


@dataclass
class Comparison:
    """Max / mean |logit difference| of two models over the same rows.

    In fp32 (or with an explicit ``verify.tolerance``) the check is ``max_abs <= tolerance``, the
    fp32 default scaled to the model (``model_shape``, ``logit_scale``: :func:`fp32_tolerance`). In
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
    model_shape: tuple[int, int] | None = None
    """(layers, hidden size) the fp32 default bound was scaled to; None: an explicit or relative bound."""
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
    def margin(self) -> float | None:
        """tolerance / max_abs (absolute bounds only): how far inside the bound the conversion is."""
        if self.tolerance is None:
            return None
        return self.tolerance / self.max_abs if self.max_abs > 0 else float("inf")

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
            scaled = ""
            if self.model_shape is not None:
                scaled = f" = fp32 bound for {self.model_shape[0]} layers x {self.model_shape[1]}"
            margin = f", margin {self.margin:.1f}x" if self.passed and self.margin is not None else ""
            return f"{head}, tolerance {self.tolerance:.3g}{scaled}{margin}): {verdict}"
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
        if self.model_shape is not None:
            out["fp32_bound"] = {
                "num_layers": self.model_shape[0],
                "hidden_size": self.model_shape[1],
                "rule": f"max({FP32_FLOOR:g}, {FP32_FACTOR:g} * eps32 * logit_scale * "
                "sqrt(num_layers * hidden_size))",
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
    *,
    model_shape: tuple[int, int] | None = None,
) -> Comparison:
    """Compare per-row ``[S, V]`` logits (other may carry padded vocabulary columns: ignored).

    Args:
        reference, other: the two sides' logits, computed in ``dtype``.
        dtype: the compute dtype of both sides.
        tolerance: an absolute bound on max |reference - other|; None: in fp32 the bound scaled to
            the model (needs ``model_shape``), in bf16/fp16 the relative bound (needs ``reference_fp32``).
        reference_fp32: the reference side's logits with its weights upcast to fp32 (bf16/fp16 only).
        model_shape: (transformer layers, hidden size) of the compared models (fp32 default bound).

    Raises:
        ValueError: a low-precision dtype without ``tolerance`` nor ``reference_fp32``; fp32 without
            ``tolerance`` nor ``model_shape``.
    """
    max_abs, mean_abs = _abs_diff(reference, other)
    name = dtype_name(dtype)
    extra: dict[str, float] = {}
    if tolerance is None and name != "fp32":
        if reference_fp32 is None:
            raise ValueError(f"compare_logits: {name} without a tolerance needs the reference's fp32 logits.")
        extra["reference_error_max"], extra["reference_error_mean"] = _abs_diff(reference_fp32, reference)
        extra["error_max"], extra["error_mean"] = _abs_diff(reference_fp32, other)
    logit_scale = max(float(r.abs().max()) for r in reference)
    scaled_to = None
    if tolerance is None and name == "fp32":
        if model_shape is None:
            raise ValueError("compare_logits: fp32 without a tolerance needs the model's (layers, hidden).")
        tolerance = fp32_tolerance(logit_scale, *model_shape)
        scaled_to = model_shape
    return Comparison(
        max_abs=max_abs,
        mean_abs=mean_abs,
        tolerance=tolerance,
        dtype=name,
        rows=len(reference),
        tokens=sum(int(r.shape[0]) for r in reference),
        logit_scale=logit_scale,
        model_shape=scaled_to,
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
    shape = (int(model.config.num_hidden_layers), int(model.config.hidden_size))
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
    return compare_logits(reference, logits, compute, settings.tolerance, reference_fp32, model_shape=shape)


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
                shape = (int(nemo_model.config.num_layers), int(nemo_model.config.hidden_size))
            logits = nemo_logits(mcore, rows)
            assert logits is not None  # one process: it is the last pipeline stage
            results.append(logits)
            del mcore
    reference_fp32 = results[2] if len(results) > 2 else None
    return compare_logits(
        results[0], results[1], compute, settings.tolerance, reference_fp32, model_shape=shape
    )
