"""Schemas of the ``import`` and ``export`` stages: one dataclass each, every field with its docstring.

    nemo-dcod import --hf /models/Qwen2.5-0.5B-Instruct --out ckpt/qwen-nemo
    nemo-dcod export --checkpoint runs/x/checkpoints/step=99-last --hf-out out/qwen-hf nemo_out=out/qwen-nemo

The flags are shorthands for the keys of the same name (``--hf DIR`` is ``hf=DIR``); any key can be
given as ``key=value``. :meth:`problems` reports everything that can be checked without reading a
checkpoint, all at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from nemo_dcod.config import choice_problems

__all__ = [
    "DEFAULT_PROMPTS",
    "FP32_FACTOR",
    "FP32_FLOOR",
    "LOW_PRECISION_FACTORS",
    "ExportConfig",
    "ImportConfig",
    "VerifySection",
    "fp32_tolerance",
]

# Computing in fp32, both sides run the same math in a different order (fused vs unfused kernels,
# another reduction split), so their logits differ by fp32 rounding, which grows with the logits'
# size, the depth and the width: a dot product of length K carries a rounding error ~ eps * sqrt(K)
# of its size (random-walk accumulation), and L residual blocks add theirs. The bound is therefore
#     tolerance = FP32_FACTOR * eps32 * max|logit| * sqrt(num_layers * hidden_size),
# never below FP32_FLOOR (the former fixed bound, which held on every tiny test model).
# Measured (max over 5 rows of 32 tokens), as r = |dlogit| / (eps32 * max|logit| * sqrt(L * H)):
# one fp32 side against fp64, r = 0.09-0.29 on SmolLM2-135M's first 2..30 layers and 0.05-0.34 on
# random Llama-like stacks of 2-16 layers x 64-1024; two fp32 sides against each other (both
# round): transformers' sdpa vs eager attention on SmolLM2 9.9e-5 (r = 0.16), our import 9.9e-5
# (r = 0.16), the export of a student trained 2 steps from it 2.9e-4 (r = 0.45). FP32_FACTOR = 8
# keeps >= 17x over the largest. What it gives at max|logit| = 40 (eps32 = 1.19e-7): SmolLM2-135M
# (30 x 576) 5.0e-3; Llama-3.1-8B (32 x 4096) 1.4e-2; Llama-3.1-70B (80 x 8192) 3.1e-2. Wrong
# conversions are far above it: on SmolLM2 one layer's gate/up swapped moves the logits by 9-62,
# the RoPE base off by 1% by 0.095 (over 32-token rows; the error grows with position).
FP32_FACTOR = 8.0
FP32_FLOOR = 1e-4


def fp32_tolerance(logit_scale: float, num_layers: int, hidden_size: int) -> float:
    """The fp32 bound on max |logit difference| for a model of this depth and width whose reference
    logits reach ``logit_scale`` in absolute value (see :data:`FP32_FACTOR`).

    Args:
        logit_scale: max |logit| of the reference side over the compared rows.
        num_layers: transformer layers.
        hidden_size: the residual stream's width.
    """
    eps = 2.0**-23  # torch.finfo(torch.float32).eps
    scaled = FP32_FACTOR * eps * logit_scale * math.sqrt(max(num_layers, 1) * max(hidden_size, 1))
    return max(FP32_FLOOR, scaled)


# Computing in bf16/fp16 (verify.dtype=checkpoint), no fixed bound works: rounding errors grow with
# depth, width and logit size. Measured, HF vs NeMo both in bf16, on tiny random bf16 models: max
# |dlogit| 0.2-0.9 at 4 layers x 64, 1.7-2.4 at 16 x 64, 2.3-7.4 at 8-16 x 256 (the old fixed 1.0
# failed correct conversions), while a swapped gate/up projection in one layer gave 4-9. So the
# bound is relative, as kernel tests do it (FlashAttention's): the reference side (transformers) is
# run in fp32 too (the exact logits of the same weights), and the other side's error against those
# must stay within a factor of the reference's own low-precision error, on the max and on the mean.
# Measured over 18 correct conversions (3 families x 3 shapes x 2 seeds): max ratio 0.61-2.14,
# mean ratio 0.86-1.16; with one layer's gate/up swapped: max >= 3.6, mean >= 14.8.
LOW_PRECISION_FACTORS: dict[str, float] = {"max": 4.0, "mean": 2.0}

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Question: What is 17 * 23? Answer: Let's think step by step.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]


@dataclass
class VerifySection:
    """Logit parity between the two sides of a conversion."""

    enabled: bool = True
    """Run the check (``--no-verify`` turns it off)."""
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """Texts run through both models (tokenized with the checkpoint's tokenizer)."""
    random_rows: int = 2
    """Extra rows of random token ids over the whole vocabulary (every embedding row can matter)."""
    seq_length: int = 32
    """Tokens per row (prompts are truncated to it)."""
    dtype: str = field(default="fp32", metadata={"choices": ("fp32", "checkpoint")})
    """Compute dtype of both sides: fp32 (bf16/fp16 weights upcast exactly: checks the conversion to
    fp32 rounding whatever the checkpoint's dtype; see FP32_FACTOR), or checkpoint (the checkpoint's
    own dtype, for an export the HF folder's: also checks the two implementations' low-precision
    kernels, against a bound relative to the reference's own low-precision error; see
    LOW_PRECISION_FACTORS)."""
    tolerance: float | None = None
    """Max |logit difference| allowed between the two sides; null: in fp32 8 * eps32 * max|logit| *
    sqrt(layers * hidden) (at least 1e-4; 5.0e-3 for SmolLM2-135M, 1.4e-2 for an 8B Llama), and in bf16/fp16
    the relative bound (the other side's error vs the reference's fp32 logits within 4x the
    reference's own bf16 error on the max, 2x on the mean)."""
    seed: int = 0
    """Seeds the random rows."""

    def problems(self, prefix: str = "verify") -> list[str]:
        out = choice_problems(self, prefix)
        if self.enabled and not self.prompts and self.random_rows < 1:
            out.append(f"{prefix}.prompts is empty and {prefix}.random_rows=0: nothing to compare.")
        if self.random_rows < 0:
            out.append(f"{prefix}.random_rows={self.random_rows}: must be >= 0.")
        if self.seq_length < 2:
            out.append(f"{prefix}.seq_length={self.seq_length}: must be >= 2.")
        if self.tolerance is not None and self.tolerance <= 0:
            out.append(f"{prefix}.tolerance={self.tolerance}: must be > 0, or null for the dtype's default.")
        return out


@dataclass
class ImportConfig:
    """``nemo-dcod import``: a local Hugging Face checkpoint -> a NeMo 2 checkpoint."""

    hf: str = ""
    """The Hugging Face checkpoint folder (``--hf``): config.json, safetensors shards, tokenizer."""
    out: str = ""
    """The NeMo 2 checkpoint folder to write (``--out``); usable as ``model.init_from`` of ``train``."""
    family: str | None = None
    """Expected family (llama | qwen2 | qwen3, or a train family such as llama3.1); null: from config.json."""
    overwrite: bool = False
    """Replace ``out`` if it exists (``--overwrite``); otherwise an existing ``out`` is an error."""
    verify: VerifySection = field(default_factory=VerifySection)
    """Same prompts through transformers and the new NeMo checkpoint, after the import."""

    def problems(self) -> list[str]:
        out = []
        if not self.hf:
            out.append("hf: required; the Hugging Face checkpoint folder (--hf DIR or hf=DIR).")
        if not self.out:
            out.append("out: required; the NeMo checkpoint folder to write (--out DIR or out=DIR).")
        if self.hf and self.out and self.hf.rstrip("/") == self.out.rstrip("/"):
            out.append(f"out={self.out}: must differ from hf.")
        out.extend(self.verify.problems())
        return out


@dataclass
class ExportConfig:
    """``nemo-dcod export``: a NeMo 2 checkpoint (any TP/PP) -> Hugging Face and/or a plain NeMo 2 one."""

    checkpoint: str = ""
    """The NeMo 2 checkpoint (``--checkpoint``): from ``nemo-dcod train`` or ``import``, or a run's
    ``checkpoints/`` folder (its newest complete checkpoint, as ``score`` takes it)."""
    hf_out: str | None = None
    """Hugging Face folder to write (``--hf-out``): sharded safetensors + index, config, tokenizer."""
    nemo_out: str | None = None
    """NeMo 2 checkpoint to write whose context names only NeMo classes (loadable without nemo_dcod)."""
    tokenizer: str | None = None
    """Tokenizer when the checkpoint has none: a HF folder or a NeMo checkpoint (e.g. the import)."""
    max_shard_size: str = "5GB"
    """Largest safetensors shard of the HF folder."""
    dtype: str = field(default="checkpoint", metadata={"choices": ("checkpoint", "bf16", "fp16", "fp32")})
    """Weights of the HF folder: checkpoint (the checkpoint's precision: bf16 for the import of a bf16
    model, fp32 for an fp32 training run), or a dtype (fp32 -> bf16 rounds to nearest, as released
    checkpoints are). The NeMo output keeps the checkpoint's dtype."""
    overwrite: bool = False
    """Replace existing outputs (``--overwrite``); otherwise an existing output is an error."""
    verify: VerifySection = field(default_factory=VerifySection)
    """Same prompts through the NeMo checkpoint and the exported HF folder."""

    def problems(self) -> list[str]:
        out = choice_problems(self)
        if not self.checkpoint:
            out.append("checkpoint: required; the NeMo 2 checkpoint (--checkpoint DIR or checkpoint=DIR).")
        if not self.hf_out and not self.nemo_out:
            out.append("hf_out / nemo_out: give at least one output (--hf-out DIR, nemo_out=DIR).")
        if self.hf_out and self.nemo_out and self.hf_out.rstrip("/") == self.nemo_out.rstrip("/"):
            out.append(f"hf_out={self.hf_out}, nemo_out={self.nemo_out}: must differ.")
        for name in ("hf_out", "nemo_out"):
            value = getattr(self, name)
            if value and self.checkpoint and value.rstrip("/") == self.checkpoint.rstrip("/"):
                out.append(f"{name}={value}: must differ from checkpoint.")
        out.extend(self.verify.problems())
        return out
