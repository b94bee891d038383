"""Tiny random Hugging Face checkpoints of each supported family, made offline.

Weights come from transformers' own model classes built from its config classes (no hub access);
every norm weight and every bias is then randomised, so that a converter which skips one of them
(NeMo keeps the layer's init value and only warns) changes the logits and fails the comparison.
The tokenizer is a word-level ``tokenizers`` model over a small made-up vocabulary, with
bos/eos/pad/unk tokens and a chat template, saved as a ``PreTrainedTokenizerFast``.

The Llama shape equals ``nemo_dcod.model.families.TINY`` with the RoPE settings of
``Llama31Config8B`` (base 500000, llama3 scaling 8/1/4/8192), so an imported tiny Llama is a valid
``model.init_from`` for ``nemo-dcod train model.family=llama3.1 model.size=tiny``. The families
are also named as ``nemo-dcod train`` names them (:data:`TRAIN_FAMILIES`): ``llama3.2`` is Llama 3.2's
form (tied embeddings, llama3 scaling factor 32, as ``Llama32Config1B``), ``llama3.3`` Llama 3.3's
(as ``Llama31Config70B``: Llama 3.1's settings), ``qwen2.5`` the qwen2 architecture.

Released checkpoints are bf16: ``make_hf_checkpoint(..., dtype=torch.bfloat16)`` saves one (the
random values are drawn in fp32 and rounded once), ``hf_logits(..., dtype=torch.float32)`` runs a
folder with its weights upcast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

VOCAB = 256  # a multiple of 128 * 2: Megatron's padding leaves it unchanged at TP = 1 and 2
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)
PROMPTS = [
    "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12",
    "w100 w7 w42 w42 w3 w200 w17 w5 w8 w9 w250 w0",
]

SHAPE: dict[str, Any] = {
    "num_hidden_layers": 4,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 64,
    "vocab_size": VOCAB,
    "rms_norm_eps": 1e-5,
}


# `nemo-dcod train` family -> (architecture, settings of that release over the architecture's tiny config).
TRAIN_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3.1": ("llama", {}),
    "llama3.2": ("llama", {"tie_word_embeddings": True, "rope_factor": 32.0}),
    "llama3.3": ("llama", {}),
    "qwen2.5": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}


def hf_config(family: str, **overrides: Any) -> Any:
    """A transformers config of ``family`` at the tiny shape.

    Args:
        family: an architecture (llama | qwen2 | qwen3) or a train family (:data:`TRAIN_FAMILIES`).
        overrides: config fields; ``rope_factor`` sets Llama's llama3 RoPE scaling factor.
    """
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    if family in TRAIN_FAMILIES:
        family, release = TRAIN_FAMILIES[family]
        overrides = {**release, **overrides}
    rope_factor = float(overrides.pop("rope_factor", 8.0))
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    if family == "llama":
        values: dict[str, Any] = {
            **SHAPE,
            **ids,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": rope_factor,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "tie_word_embeddings": False,
        }
        values.update(overrides)
        return LlamaConfig(**values)
    if family == "qwen2":
        values = {**SHAPE, **ids, "rope_theta": 1000000.0, "tie_word_embeddings": True}
        values.pop("head_dim")  # Qwen2 derives it: hidden / heads
        values.update(overrides)
        return Qwen2Config(**values)
    if family == "qwen3":
        values = {**SHAPE, **ids, "rope_theta": 1000000.0, "tie_word_embeddings": True, "head_dim": 32}
        values.update(overrides)
        return Qwen3Config(**values)
    raise ValueError(f"unknown family {family!r}")


def make_tokenizer(vocab_size: int = VOCAB) -> Any:
    """A word-level fast tokenizer with ``vocab_size`` tokens: specials, then ``w0, w1, ...``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for i in range(vocab_size - len(SPECIALS)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: norms around 1 (not 1), biases around 0 (not 0), weights N(0, 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.5 * noise)
            else:
                param.copy_(0.2 * noise)


def make_hf_checkpoint(
    path: Path,
    family: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    tokenizer_vocab: int | None = None,
    **overrides: Any,
) -> Path:
    """Save a tiny random ``family`` model with its tokenizer and generation config to ``path``.

    Args:
        path: the folder to write.
        family: see :func:`hf_config`.
        seed: seeds the weights.
        dtype: dtype of the saved weights (and config.json's ``dtype``): bf16 as released models.
        max_shard_size: shard the safetensors (e.g. ``"200KB"``); None: one file.
        tokenizer_vocab: tokens of the tokenizer; None: the model's vocab_size.
        overrides: config fields (:func:`hf_config`).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    randomize_(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, do_sample=False).save_pretrained(path)
    make_tokenizer(tokenizer_vocab or config.vocab_size).save_pretrained(path)
    return path


def shard_files(path: Path) -> list[str]:
    """The safetensors files listed by ``path``'s index (or the single file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def hf_logits(path: Path, input_ids: torch.Tensor, dtype: torch.dtype | str = "auto") -> torch.Tensor:
    """``[B, S, V]`` float32 logits of the HF model at ``path``, computed in ``dtype``.

    ``dtype``: "auto" (the saved weights' dtype) or a torch dtype (e.g. float32: bf16 weights upcast).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def safetensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the HF folder ``path`` (all shards), by name, as stored."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in shard_files(path):
        out.update(load_file(path / name))
    return out


def logit_rows(seed: int = 7) -> list[torch.Tensor]:
    """``[S_i]`` int64 rows: :data:`PROMPTS` (word-level ids), then 40 random ids over the vocabulary."""
    tok = make_tokenizer()
    rows = [torch.tensor(tok(p)["input_ids"]) for p in PROMPTS]
    rows.append(torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(seed)))
    return rows
