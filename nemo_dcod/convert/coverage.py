"""Make NeMo's state-dict conversion complete and checked, for either layer spec.

NeMo's HF connectors convert weights with ``io.apply_transforms(source, target, mapping,
transforms)``: every mapping entry is a pair of glob patterns, and an entry whose pattern matches
nothing is skipped with a "No matches found" *warning*; the target tensor keeps whatever it was
initialised to. Their mappings name the layer norms the way Transformer Engine's fused layers do
(``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``), while
Megatron's local spec (what runs without TE, on CPU) has separate ``input_layernorm`` /
``pre_mlp_layernorm`` modules. So, with the local spec (FACTS.md, item 7):

* **import** silently leaves every per-layer norm weight at 1.0. :func:`copy_local_norms` runs a
  second ``apply_transforms`` pass (NeMo's own machinery) with the local names;
* **export** crashes (``IndexError`` in ``nemo/lightning/io/state.py``). :func:`nemo_source`
  presents the local model's state under the TE names, which is the renaming Megatron itself
  applies when it writes a local-spec distributed checkpoint (the spec's
  ``sharded_state_dict_keys_map``), so the exporter's mapping matches.

And for any spec, so that no skipped tensor goes unnoticed:

* the source state is wrapped in a :class:`ReadTracker` (a dict that records every key read);
  afterwards every source tensor must have been read, except aliases of one that was (tied
  embeddings appear twice in a HF state dict) and Transformer Engine's ``_extra_state`` bytes;
* the target parameters' storage addresses are recorded before the conversion; ``apply_transforms``
  re-registers every target parameter, so one whose storage is unchanged afterwards was never
  written. This reads no tensor data and allocates nothing (the exporter's HF model is created
  with ``no_init_weights``: its untouched memory is never paged in).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "LOCAL_TO_TE_NORMS",
    "ConversionError",
    "Coverage",
    "ReadTracker",
    "copy_local_norms",
    "megatron_module",
    "nemo_source",
    "parameter_storage",
    "tracked_state",
]

# Megatron's local GPT layer spec stores its norms under TE's names in distributed checkpoints
# (megatron/core/models/gpt/gpt_layer_specs.py, get_gpt_layer_local_spec); the same renaming here.
LOCAL_TO_TE_NORMS: dict[str, str] = {
    ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
    ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
}
_LOCAL_NORM = re.compile(r"^(.*\.layers\.\d+)(\.input_layernorm\.weight|\.pre_mlp_layernorm\.weight)$")

# HF name -> NeMo local-spec name, for every family we convert (the HF side is the same for all).
HF_TO_LOCAL_NORMS: dict[str, str] = {
    "model.layers.*.input_layernorm.weight": "decoder.layers.*.input_layernorm.weight",
    "model.layers.*.post_attention_layernorm.weight": "decoder.layers.*.pre_mlp_layernorm.weight",
}


class ConversionError(RuntimeError):
    """A conversion left a source tensor unused or a target tensor unwritten."""


class ReadTracker(dict[str, Any]):
    """A state dict that remembers which keys were read (``d[key]`` or ``d.get(key)``)."""

    def __init__(self, state: dict[str, Any]) -> None:
        super().__init__(state)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def tracked_state(state: dict[str, Any], config: Any) -> Any:
    """A NeMo ``_ModelState`` over ``state`` (a source ``apply_transforms`` accepts), tracking reads."""
    from nemo.lightning.io.state import _ModelState

    return _ModelState(ReadTracker(state), config=config)


def nemo_source(model: Any) -> Any:
    """The state of a NeMo model as its exporter expects it, with reads tracked.

    Args:
        model: a NeMo ``GPTModel`` (LightningModule) after its weights were loaded.

    Local-spec norm names are renamed to TE's (:data:`LOCAL_TO_TE_NORMS`); TE-spec state is
    passed through. Tensors are not copied.
    """
    state = {}
    renamed = 0
    for key, value in megatron_module(model).state_dict().items():
        if key.endswith("_extra_state"):
            continue
        match = _LOCAL_NORM.match(key)
        renamed += bool(match)
        state[match.group(1) + LOCAL_TO_TE_NORMS[match.group(2)] if match else key] = value
    tracked = tracked_state(state, model.config)
    tracked.local_norms_renamed = renamed
    return tracked


def parameter_storage(module: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> storage address (no data is read), to find parameters left unwritten."""
    return {name: param.untyped_storage().data_ptr() for name, param in module.named_parameters()}


def megatron_module(target: Any) -> torch.nn.Module:
    """The Megatron model inside a NeMo LightningModule (the module itself otherwise)."""
    from megatron.core.transformer.module import MegatronModule

    inner = getattr(target, "module", None)
    return inner if isinstance(inner, MegatronModule) else target


def copy_local_norms(source: Any, target: Any) -> int:
    """Import into a local-spec model: copy the per-layer norms NeMo's mapping missed.

    Returns:
        The number of norm tensors copied (0 for a TE-spec target, whose norms NeMo mapped).
    """
    from nemo.lightning import io

    names = megatron_module(target).state_dict().keys()
    if not any(k.endswith(".input_layernorm.weight") for k in names):
        return 0
    io.apply_transforms(source, target, mapping=dict(HF_TO_LOCAL_NORMS))
    return sum(k.endswith((".input_layernorm.weight", ".pre_mlp_layernorm.weight")) for k in names)


def _aliases(state: dict[str, Any], read: set[str]) -> set[str]:
    """Unread keys whose tensor shares storage, shape and offset with a read one (tied weights)."""

    def ident(t: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
        return (t.untyped_storage().data_ptr(), int(t.storage_offset()), tuple(t.shape))

    seen = {
        ident(dict.__getitem__(state, k))
        for k in read
        if isinstance(dict.__getitem__(state, k), torch.Tensor)
    }
    return {
        k
        for k in state
        if k not in read
        and isinstance(dict.__getitem__(state, k), torch.Tensor)
        and ident(dict.__getitem__(state, k)) in seen
    }


@dataclass
class Coverage:
    """What a conversion read and wrote; :meth:`check` raises if anything was skipped."""

    what: str
    """``import`` or ``export`` (for messages)."""
    source_tensors: int = 0
    source_unread: list[str] = field(default_factory=list)
    source_aliases: list[str] = field(default_factory=list)
    target_tensors: int = 0
    target_unwritten: list[str] = field(default_factory=list)
    norms_remapped: int = 0

    @classmethod
    def measure(
        cls,
        what: str,
        source: Any,
        target_module: torch.nn.Module,
        storage_before: dict[str, int],
        ignore_unread: Iterable[str] = (),
        norms_remapped: int = 0,
    ) -> Coverage:
        """Compare the tracked ``source`` and ``target_module`` with the storage recorded before."""
        state: ReadTracker = source.state_dict()
        ignored = set(ignore_unread)
        aliases = _aliases(state, state.read)
        unread = sorted(k for k in state if k not in state.read and k not in aliases and k not in ignored)
        after = parameter_storage(target_module)
        unwritten = sorted(n for n, ptr in after.items() if storage_before.get(n) == ptr)
        return cls(
            what=what,
            source_tensors=len(state),
            source_unread=unread,
            source_aliases=sorted(aliases),
            target_tensors=len(after),
            target_unwritten=unwritten,
            norms_remapped=norms_remapped,
        )

    def problems(self) -> list[str]:
        """Every skipped tensor, as lines of a message."""
        out = []
        if self.source_unread:
            out.append(
                f"{len(self.source_unread)} source tensor(s) were not converted: {_short(self.source_unread)}"
            )
        if self.target_unwritten:
            out.append(
                f"{len(self.target_unwritten)} target tensor(s) were left at their initial value: "
                f"{_short(self.target_unwritten)}"
            )
        return out

    def check(self) -> None:
        """Raise :class:`ConversionError` listing what NeMo's mapping skipped."""
        problems = self.problems()
        if problems:
            raise ConversionError(
                f"{self.what}: the conversion is incomplete (NeMo's mapping skips unmatched names with "
                "only a warning):\n  - " + "\n  - ".join(problems)
            )

    def summary(self) -> dict[str, Any]:
        """A JSON-able record of the conversion."""
        return {
            "source_tensors": self.source_tensors,
            "source_tied_aliases": self.source_aliases,
            "target_tensors": self.target_tensors,
            "local_spec_norms_remapped": self.norms_remapped,
        }


def _short(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
