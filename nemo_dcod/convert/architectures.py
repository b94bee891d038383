"""Which Hugging Face checkpoints we convert, and their NeMo ``GPTConfig``.

One row per family: the HF ``architectures`` entry, NeMo's model class, and NeMo's HF importer
and exporter for it. The NeMo config is built here rather than by the importers' own ``config``
property, because that property, in NeMo 2.7.3,

* constructs ``LlamaConfig`` with ``apply_rope_fusion=True``, which raises without Transformer
  Engine (so import cannot even start on a CPU machine);
* reads only ``factor`` of Llama 3's ``rope_scaling`` (``low_freq_factor``, ``high_freq_factor``
  and ``original_max_position_embeddings`` fall back to Llama 3.1's values);
* unties Qwen2's embeddings (``share_embeddings_and_output_weights=False`` whatever the
  checkpoint says; Qwen2.5 0.5B-3B are tied);
* drops Qwen3's ``head_dim`` (NeMo's default 128) and ``max_position_embeddings``.

Everything else is NeMo's translation, field by field. What we cannot convert faithfully (other
RoPE scalings, biases NeMo's mappings do not carry, sliding-window attention, activations other
than SiLU) is refused with the field that makes it so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from nemo_dcod.model.families import _FUSIONS, have_transformer_engine

__all__ = ["FAMILIES", "Family", "family_of", "nemo_config_from_hf", "unsupported_reasons"]


@dataclass(frozen=True)
class Family:
    """A supported architecture: names on both sides."""

    name: str
    """Our name: llama | qwen2 | qwen3 (``nemo-dcod import family=...``)."""
    hf_architecture: str
    """``architectures[0]`` of the HF config."""
    model_class: str
    """NeMo's model class in ``nemo.collections.llm``, recorded in the checkpoint's context."""
    train_families: tuple[str, ...]
    """``model.family`` values of ``nemo-dcod train`` with this architecture."""


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM", "LlamaModel", ("llama3.1", "llama3.2", "llama3.3")),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", "Qwen2Model", ("qwen2.5",)),
    "qwen3": Family("qwen3", "Qwen3ForCausalLM", "Qwen3Model", ("qwen3",)),
}


def family_of(hf_config: Any) -> Family:
    """The family of a transformers config.

    Raises:
        ValueError: the architecture is not one we convert, naming the supported ones.
    """
    archs = list(getattr(hf_config, "architectures", None) or [])
    for family in FAMILIES.values():
        if family.hf_architecture in archs:
            return family
    model_type = getattr(hf_config, "model_type", None)
    supported = ", ".join(f.hf_architecture for f in FAMILIES.values())
    raise ValueError(
        f"config.json: architectures={archs or None} (model_type={model_type!r}) is not supported; "
        f"nemo-dcod converts {supported}."
    )


def unsupported_reasons(family: Family, hf_config: Any) -> list[str]:
    """Settings of a supported architecture that the NeMo conversion would not carry over."""
    out: list[str] = []
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        out.append(f"hidden_act={act!r}: only 'silu' (SwiGLU) is converted.")
    rope = getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope and not (family.name == "llama" and rope_type == "llama3"):
        out.append(f"rope_scaling={rope}: only Llama 3's rope_type='llama3' scaling is converted.")
    if family.name == "llama":
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(hf_config, flag, False):
                out.append(f"{flag}=true: NeMo's Llama mapping has no biases.")
    if family.name == "qwen3" and getattr(hf_config, "attention_bias", False):
        out.append("attention_bias=true: NeMo's Qwen3 mapping has no QKV bias.")
    if getattr(hf_config, "use_sliding_window", False):
        out.append("use_sliding_window=true: sliding-window attention is not converted.")
    if getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", None):
        out.append("mixture-of-experts checkpoints are not converted.")
    return out


def _vocab_divisor(vocab_size: int) -> int:
    """The largest power of two <= 128 dividing the vocabulary: no padding rows at TP = 1 (as NeMo)."""
    base = 128
    while vocab_size % base:
        base //= 2
    return base


def _hf_dtype(hf_config: Any) -> torch.dtype:
    # transformers >= 4.56 names it `dtype` (reading `torch_dtype` there only warns that it is deprecated).
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"config.json: torch_dtype={dtype}: expected float32, bfloat16 or float16.")
    result: torch.dtype = dtype
    return result


def nemo_config_from_hf(
    hf_config: Any,
    generation_config: Any = None,
    *,
    fusions: bool | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """NeMo's ``GPTConfig`` for a supported HF config (see the module docstring for what we fix).

    Args:
        hf_config: a transformers ``PretrainedConfig`` of a family in :data:`FAMILIES`.
        generation_config: the checkpoint's ``GenerationConfig``, recorded in the NeMo config.
        fusions: keep the family's fused kernels (RoPE, bias, softmax: Transformer Engine / CUDA
            only); ``None``: when Transformer Engine and a GPU are present. The layer spec is
            NeMo's default (TE's when installed, else Megatron's local one); both store the
            same distributed-checkpoint keys, so the checkpoint does not depend on it.
        dtype: parameter dtype; ``None``: the checkpoint's ``torch_dtype``.
    """
    from nemo.collections import llm
    from nemo.collections.llm.gpt.model.llama import Llama31Config

    family = family_of(hf_config)
    reasons = unsupported_reasons(family, hf_config)
    if reasons:
        raise ValueError("config.json: " + " ".join(reasons))
    dtype = dtype or _hf_dtype(hf_config)
    vocab = int(hf_config.vocab_size)
    values: dict[str, Any] = {
        "num_layers": hf_config.num_hidden_layers,
        "hidden_size": hf_config.hidden_size,
        "ffn_hidden_size": hf_config.intermediate_size,
        "num_attention_heads": hf_config.num_attention_heads,
        "num_query_groups": getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
        "kv_channels": getattr(hf_config, "head_dim", None),
        "init_method_std": hf_config.initializer_range,
        "layernorm_epsilon": hf_config.rms_norm_eps,
        "rotary_base": hf_config.rope_theta,
        "seq_length": hf_config.max_position_embeddings,
        "vocab_size": vocab,
        "make_vocab_size_divisible_by": _vocab_divisor(vocab),
        "share_embeddings_and_output_weights": bool(getattr(hf_config, "tie_word_embeddings", False)),
        "fp16": dtype == torch.float16,
        "bf16": dtype == torch.bfloat16,
        "params_dtype": dtype,
        "generation_config": generation_config,
    }
    if family.name == "llama":
        rope = hf_config.rope_scaling or {}
        if rope:
            cls: type = Llama31Config
            values.update(
                scale_factor=float(rope.get("factor", 8.0)),
                low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                old_context_len=int(rope.get("original_max_position_embeddings", 8192)),
            )
        else:
            cls = llm.LlamaConfig
        values["gated_linear_unit"] = True
    elif family.name == "qwen2":
        cls = llm.Qwen2Config
        values["kv_channels"] = None  # Qwen2 has no head_dim: hidden / heads
    else:
        cls = llm.Qwen3Config
        values["kv_channels"] = hf_config.head_dim
        values["max_position_embeddings"] = hf_config.max_position_embeddings
    if values["kv_channels"] is None:
        values["kv_channels"] = hf_config.hidden_size // hf_config.num_attention_heads
    fields = {f.name for f in dataclasses.fields(cls)}
    if not (have_transformer_engine() if fusions is None else fusions):
        values.update({name: False for name in _FUSIONS if name in fields})
    return cls(**values)
