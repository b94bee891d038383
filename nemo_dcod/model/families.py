"""Student model families from NeMo's own configs: plain Llama, Llama 3.x, Qwen2.5, Qwen3, and a tiny
size of each.

A family + size names one of NeMo's ``GPTConfig`` subclasses (``Llama31Config8B``, ``Qwen3Config8B``,
...), so architecture details (GQA, RoPE base and Llama 3.1's RoPE scaling, QKV bias, QK-norm,
tied embeddings) are NeMo's, not ours. The ``tiny`` size keeps the family's architecture at a few
thousand parameters per layer for tests and the CPU demo.

A family's class also carries behaviour that a checkpoint's values do not control: NeMo's
``Llama31Config`` (and 3.2 / 3.3, its subclasses) rescales the rotary frequencies in
``configure_model`` (Llama 3's ``scale_factor``), so a plain Llama (SmolLM2, TinyLlama, Llama 2:
no ``rope_scaling``) trained as ``llama3.1`` would be changed before it trains. The plain
``llama`` family is NeMo's ``LlamaConfig`` (no scaling). With ``model.init_from`` the family is
taken from the checkpoint (:func:`family_of_checkpoint`), and a family named explicitly must not
contradict the checkpoint on what the family fixes (:data:`FAMILY_SETTINGS`, :func:`contradictions`).

:func:`build_gpt_config` then applies what the plug-in needs on top:

* our data and forward steps (teacher fields to the last stage, logits out);
* ``calculate_per_token_loss=True``: the loss is the mean over the global token count;
* the layer spec: Transformer Engine's on a GPU with TE installed, otherwise Megatron's local
  spec with every fused kernel off (the fusions are TE/CUDA-only);
* parallel sizes and precision copied from the training config.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
from pathlib import Path
from typing import Any

__all__ = [
    "FAMILIES",
    "FAMILY_SETTINGS",
    "TINY",
    "architecture",
    "build_gpt_config",
    "config_of_family",
    "contradictions",
    "family_config_class",
    "family_of_checkpoint",
    "have_transformer_engine",
    "init_from_family_problems",
    "use_local_layers",
]

# family -> size -> NeMo config class name (in nemo.collections.llm).
FAMILIES: dict[str, dict[str, str]] = {
    "llama": {
        "tiny": "LlamaConfig",
        "7b": "Llama2Config7B",
        "13b": "Llama2Config13B",
        "70b": "Llama2Config70B",
    },
    "llama3.1": {"tiny": "Llama31Config8B", "8b": "Llama31Config8B", "70b": "Llama31Config70B"},
    "llama3.2": {"tiny": "Llama32Config1B", "1b": "Llama32Config1B", "3b": "Llama32Config3B"},
    "llama3.3": {"tiny": "Llama31Config70B", "70b": "Llama31Config70B"},
    "qwen2.5": {
        "tiny": "Qwen25Config500M",
        "0.5b": "Qwen25Config500M",
        "1.5b": "Qwen25Config1P5B",
        "7b": "Qwen25Config7B",
        "14b": "Qwen25Config14B",
        "32b": "Qwen25Config32B",
        "72b": "Qwen25Config72B",
    },
    "qwen3": {
        "tiny": "Qwen3Config600M",
        "0.6b": "Qwen3Config600M",
        "1.7b": "Qwen3Config1P7B",
        "4b": "Qwen3Config4B",
        "8b": "Qwen3Config8B",
        "14b": "Qwen3Config14B",
        "32b": "Qwen3Config32B",
    },
}

# The tiny size: the family's architecture (norms, biases, GQA, RoPE, QK-norm) at toy width.
TINY: dict[str, Any] = {
    "num_layers": 4,
    "hidden_size": 64,
    "ffn_hidden_size": 128,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "kv_channels": 16,
    "seq_length": 64,
}

_FUSIONS = (
    "apply_rope_fusion",
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "masked_softmax_fusion",
    "persist_layer_norm",
    "gradient_accumulation_fusion",
    "cross_entropy_loss_fusion",
)


def use_local_layers(config: Any) -> Any:
    """Switch a ``GPTConfig`` to megatron-core's local layers, with every TE/CUDA-only fusion off.

    The masked-softmax fusion matters most: with the causal mask type, megatron's fused kernel
    (present in NVIDIA's containers) takes its upper-triangular path for fp16/bf16 scores up to
    4096 keys and *ignores the mask it is given* (``FusedScaleMaskSoftmax.is_kernel_available`` /
    ``forward_fused_softmax``), so packed documents would attend across their boundaries. With it
    off, the unfused softmax applies the dense block-diagonal mask, on CPU and GPU alike.
    """
    from nemo.collections.llm.gpt.model.base import local_layer_spec

    fields = {f.name for f in dataclasses.fields(config)}
    for name in _FUSIONS:
        if name in fields:
            setattr(config, name, False)
    config.transformer_layer_spec = local_layer_spec
    return config


# Where NeMo defines each family's config classes (nemo/collections/llm/gpt/model/<file>).
_SOURCES = {
    "llama": "llama.py",
    "llama3.1": "llama.py",
    "llama3.2": "llama.py",
    "llama3.3": "llama.py",
    "qwen2.5": "qwen2.py",
    "qwen3": "qwen3.py",
}
_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


@functools.cache
def _nemo_config_defaults(filename: str) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """class name -> (base names, literal field defaults) of the config dataclasses in one of NeMo's
    model files, read from its source (importing NeMo takes seconds and loads torch)."""
    spec = importlib.util.find_spec("nemo")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("nemo-toolkit is not installed: model.family/size name NeMo's configs.")
    path = Path(next(iter(spec.submodule_search_locations))) / "collections/llm/gpt/model" / filename
    tree = ast.parse(path.read_text())
    out: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, Any] = {}
        for item in node.body:
            if (
                isinstance(item, ast.AnnAssign)
                and isinstance(item.target, ast.Name)
                and item.value is not None
            ):
                try:
                    fields[item.target.id] = ast.literal_eval(item.value)
                except ValueError:
                    continue  # not a literal (a function, a field(...)): not a shape
        out[node.name] = ([b.id for b in node.bases if isinstance(b, ast.Name)], fields)
    return out


def architecture(family: str, size: str) -> dict[str, int]:
    """Layers, widths, heads and query groups of a family's size, as NeMo's config class defines
    them (read from NeMo's source, inheritance resolved; no NeMo or torch import). ``tiny``: the
    plug-in's :data:`TINY` shape.

    Raises:
        ValueError: an unknown family or size, or a class whose shape NeMo's source does not give.
    """
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r}: must be one of {', '.join(FAMILIES)}.")
    if size not in FAMILIES[family]:
        raise ValueError(f"model.size={size!r}: {family} has sizes {', '.join(FAMILIES[family])}.")
    if size == "tiny":
        return {k: TINY[k] for k in _SHAPE_FIELDS}
    classes = _nemo_config_defaults(_SOURCES[family])
    resolved: dict[str, Any] = {}

    def collect(name: str) -> None:
        if name not in classes:
            return
        bases, fields = classes[name]
        for base in reversed(bases):  # the first base wins, as in Python's MRO for these chains
            collect(base)
        resolved.update(fields)

    collect(FAMILIES[family][size])
    resolved.setdefault("num_query_groups", resolved.get("num_attention_heads"))
    missing = [k for k in _SHAPE_FIELDS if not isinstance(resolved.get(k), int)]
    if missing:
        raise ValueError(f"{family}-{size}: NeMo's {FAMILIES[family][size]} gives no {missing}.")
    return {k: int(resolved[k]) for k in _SHAPE_FIELDS}


def _ancestors(name: str, classes: dict[str, tuple[list[str], dict[str, Any]]]) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(classes.get(current, ([], {}))[0])
    return seen


def config_of_family(target: str, family: str, size: str) -> bool:
    """Whether a checkpoint's recorded config class (its ``_target_``, e.g.
    ``nemo.collections.llm.gpt.model.qwen2.Qwen2Config``) belongs with ``family``/``size``: one of
    the two classes derives from the other (read from NeMo's source, no import).

    Family-specific behaviour (Llama 3.1's RoPE scaling, Qwen's QKV bias) lives in the class, so a
    checkpoint of another family trains as something it is not.
    """
    classes = _all_classes()
    mine, theirs = FAMILIES[family][size], target.rpartition(".")[2]
    return mine in _ancestors(theirs, classes) or theirs in _ancestors(mine, classes)


# What each family fixes whatever its size: the settings of its released checkpoints (Meta's Llama
# 3.1 8B/70B/405B, 3.2 1B/3B, 3.3 70B), equal to NeMo's classes of every size (a unit test reads
# them from NeMo's source). ``rope_scaling``: the family's class applies Llama 3's RoPE scaling. The
# plain Llama and the Qwen families fix only that they do not scale: their released sizes differ
# in RoPE base, norm epsilon or tying (and NeMo's Qwen classes disagree with the releases on tying).
FAMILY_SETTINGS: dict[str, dict[str, Any]] = {
    "llama": {"rope_scaling": False},
    "llama3.1": {
        "rope_scaling": True,
        "scale_factor": 8.0,
        "rotary_base": 500000,
        "layernorm_epsilon": 1e-5,
        "share_embeddings_and_output_weights": False,
    },
    "llama3.2": {
        "rope_scaling": True,
        "scale_factor": 32.0,
        "rotary_base": 500000,
        "layernorm_epsilon": 1e-5,
        "share_embeddings_and_output_weights": True,
    },
    "llama3.3": {
        "rope_scaling": True,
        "scale_factor": 8.0,
        "rotary_base": 500000,
        "layernorm_epsilon": 1e-5,
        "share_embeddings_and_output_weights": False,
    },
    "qwen2.5": {"rope_scaling": False},
    "qwen3": {"rope_scaling": False},
}
_SCALING_CLASS = "Llama31Config"
"""NeMo's class whose ``configure_model`` applies Llama 3's RoPE scaling (and its subclasses)."""


def _all_classes() -> dict[str, tuple[list[str], dict[str, Any]]]:
    classes: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for filename in sorted(set(_SOURCES.values())):
        classes.update(_nemo_config_defaults(filename))
    return classes


def _scales_rope(class_name: str) -> bool:
    return _SCALING_CLASS in _ancestors(class_name, _all_classes())


def _checkpoint_value(init_config: dict[str, Any], name: str) -> Any:
    if name == "rope_scaling":
        target = str(init_config.get("_target_", "")).rpartition(".")[2]
        return _scales_rope(target) if target else init_config.get("scale_factor") is not None
    return init_config.get(name)


def _same(fixed: Any, value: Any) -> bool:
    if isinstance(fixed, bool) or isinstance(value, bool):
        return bool(fixed) == bool(value)
    if isinstance(fixed, int | float) and isinstance(value, int | float):
        # fp32 round trips: SmolLM2's GGUF stores rms_norm_eps 1e-5 as 9.999999747378752e-06
        return abs(float(fixed) - float(value)) <= 1e-6 * abs(float(fixed))
    return bool(fixed == value)


def contradictions(family: str, init_config: dict[str, Any]) -> list[str]:
    """What ``family`` fixes (:data:`FAMILY_SETTINGS`) that a checkpoint's recorded config (its
    ``context/model.yaml`` ``config``) contradicts, one phrase each; empty when it agrees.

    A missing value counts as a contradiction only for RoPE scaling (read from the checkpoint's
    config class): the other settings are then not recorded, and the checkpoint's own are used.
    """
    out = []
    for name, fixed in FAMILY_SETTINGS.get(family, {}).items():
        value = _checkpoint_value(init_config, name)
        if name != "rope_scaling" and value is None:
            continue
        if not _same(fixed, value):
            if name == "rope_scaling":
                out.append(
                    f"{family} {'applies' if fixed else 'has no'} Llama 3's RoPE scaling, the checkpoint "
                    f"{'has' if value else 'has none'}"
                )
            else:
                out.append(f"{family} has {name}={fixed}, the checkpoint {value}")
    return out


def family_of_checkpoint(init_config: dict[str, Any]) -> str | None:
    """The first family (in :data:`FAMILIES` order) whose config class is related to the checkpoint's
    (:func:`config_of_family`) and contradicts none of its settings; None when no family fits."""
    target = str(init_config.get("_target_", ""))
    for family in FAMILIES:
        if config_of_family(target, family, "tiny") and not contradictions(family, init_config):
            return family
    return None


def init_from_family_problems(
    family: str | None, size: str, init_config: dict[str, Any], where: str
) -> list[str]:
    """Why a ``model.init_from`` checkpoint (its recorded config) cannot be trained as ``family``
    (null: the family it fits, which must exist); ``where`` names it in the messages."""
    target = str(init_config.get("_target_", "")) or "model of unknown class"
    if family is None:
        if family_of_checkpoint(init_config) is None:
            return [f"{where} holds a {target} that fits no model.family ({', '.join(FAMILIES)})."]
        return []
    if family not in FAMILIES or size not in FAMILIES[family]:
        return []  # reported by the family / size choices
    if not config_of_family(target, family, size):
        return [
            f"{where} holds a {target}, not a model.family={family} model ({FAMILIES[family][size]}): set "
            "model.family to the checkpoint's family, or leave it null to take it from the checkpoint."
        ]
    clashes = contradictions(family, init_config)
    if not clashes:
        return []
    fits = family_of_checkpoint(init_config)
    advice = (
        f"leave model.family null (the checkpoint is a {fits} model) or set it to {fits}."
        if fits
        else "no family fits this checkpoint."
    )
    return [
        f"model.family={family} contradicts {where}: {'; '.join(clashes)}. Training it as {family} would "
        f"change the model before it trains; {advice}"
    ]


def have_transformer_engine() -> bool:
    """Transformer Engine importable *and* a GPU present (TE raises on import without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises RuntimeError, not ImportError, when cuDNN/CUDA are missing
        return False
    return True


def family_config_class(family: str, size: str) -> type:
    """NeMo's config class for ``family`` at ``size``.

    Raises:
        ValueError: unknown family or size, listing the valid ones.
    """
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r}: must be one of {', '.join(FAMILIES)}.")
    if size not in FAMILIES[family]:
        raise ValueError(f"model.size={size!r}: {family} has sizes {', '.join(FAMILIES[family])}.")
    from nemo.collections import llm

    cls: type = getattr(llm, FAMILIES[family][size])
    return cls


def build_gpt_config(
    family: str,
    size: str,
    *,
    padded_vocab_size: int,
    seq_length: int,
    parallel: dict[str, Any],
    precision: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    use_te: bool | None = None,
) -> Any:
    """The NeMo ``GPTConfig`` of a student, with the plug-in's steps and per-token loss.

    Args:
        family, size: see :data:`FAMILIES`.
        padded_vocab_size: rows of the embedding / output layer (tokenizer size rounded up so that
            every tensor-parallel rank holds an equal shard); the loss excludes the padding.
        seq_length: tokens per sample.
        parallel: ``TransformerConfig`` parallel fields (``tensor_model_parallel_size``, ...).
        precision: ``TransformerConfig`` dtype / FP8 fields (``bf16``, ``params_dtype``, ``fp8``, ...).
        overrides: any other ``GPTConfig`` field (e.g. ``num_layers``).
        use_te: Transformer Engine layer spec; ``None``: when TE and a GPU are present.
    """
    import torch
    from nemo.collections.llm.gpt.model.base import local_layer_spec, transformer_engine_layer_spec

    from nemo_dcod.model.steps import logits_forward_step, trace_data_step

    cls = family_config_class(family, size)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = dict(TINY) if size == "tiny" else {}
    values.update(overrides or {})
    values.update(parallel)
    values.update(precision)
    te = have_transformer_engine() if use_te is None else use_te
    if not te:  # see use_local_layers
        values.update({name: False for name in _FUSIONS if name in fields})
    values.update(
        vocab_size=padded_vocab_size,
        seq_length=seq_length,
        calculate_per_token_loss=True,
        forward_step_fn=logits_forward_step,
        data_step_fn=trace_data_step,
        transformer_layer_spec=transformer_engine_layer_spec if te else local_layer_spec,
    )
    if not torch.cuda.is_available():
        values["use_cpu_initialization"] = True
        # NeMo's GPTConfig turns on deallocate_pipeline_outputs: Megatron's schedule then frees a
        # stage's output right after posting its send. A gloo isend reads that memory later (an
        # NCCL send keeps it alive for its stream), so with the non-blocking sends of the
        # interleaved schedule the next stage received freed memory (garbage, then NaN).
        values["deallocate_pipeline_outputs"] = False
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"model overrides {unknown} are not fields of {cls.__name__}.")
    return cls(**values)
