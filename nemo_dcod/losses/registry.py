"""The loss registry: every loss is one module that registers its class here by name.

A loss is a frozen dataclass whose fields are its hyper-parameters (each with a docstring), with

* ``requirements``: what it reads from the store (:class:`LossRequirements`);
* ``problems()``: every invalid value, each naming the field (the config and :func:`build_loss`
  refuse the same values with the same words);
* ``__call__(inputs, ctx) -> (loss_sum, num_tokens, metrics)``: Megatron's per-token form.

Nothing here imports torch, and neither does a loss module until it is called: configs are
validated, and ``nemo-dcod <stage> --help`` lists the losses, without loading torch.

Adding a loss::

    # my_pkg/my_loss.py
    from dataclasses import dataclass
    from nemo_dcod.losses.registry import LossRequirements, register

    @register("my_loss")
    @dataclass(frozen=True)
    class MyLoss:
        \"\"\"What it computes (the formula, the paper).\"\"\"
        scale: float = 1.0
        \"\"\"What the parameter does.\"\"\"
        requirements = LossRequirements(teacher_logprobs=True)
        def problems(self) -> list[str]:
            return [] if self.scale > 0 else [f"scale={self.scale}: must be > 0."]
        def __call__(self, inputs, ctx): ...

and train with ``loss='{name: my_loss, module: my_pkg.my_loss, scale: 2.0}'``: ``module`` is
imported first (in every rank), which registers the loss.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "BUILTIN",
    "COMMON_KEYS",
    "LossRequirements",
    "build_from_section",
    "build_loss",
    "label_of",
    "loss_class",
    "loss_names",
    "loss_problems",
    "register",
    "requirements_of",
    "split_section",
]


@dataclass(frozen=True)
class LossRequirements:
    """What a loss reads besides the student's log-probs (the data and scoring stages provide it).

    Attributes:
        teacher_logprobs: the proposal's log-prob of each trace token (``score``, or the engine's).
        teacher_topk: the teacher's top-k ids and log-probs (``score`` with ``topk > 0``).
        whole_documents: needs each document whole on one rank (a per-document or windowed
            statistic): context parallelism, which splits sequences over ranks, is refused.
    """

    teacher_logprobs: bool = False
    teacher_topk: bool = False
    whole_documents: bool = False


BUILTIN: dict[str, str] = {
    "sft": "nemo_dcod.losses.sft",
    "dft": "nemo_dcod.losses.dft",
    "iw_sft": "nemo_dcod.losses.iw_sft",
    "kl": "nemo_dcod.losses.kl",
    "todi": "nemo_dcod.losses.todi",
    "discord": "nemo_dcod.losses.discord",
}
"""The losses that come with nemo_dcod: name -> the module that registers it (imported on use)."""

COMMON_KEYS: dict[str, str] = {
    "name": "the loss: one of the registered names (see `nemo-dcod train --help`).",
    "module": "a module to import first, which registers the loss (your own losses); null: none.",
    "label": "a student's name in a study or the demo (default: the loss name).",
    "chunk_size": "rows (tokens) per chunk of the vocab-parallel log-prob op; null: one pass (fastest).",
    "validate": "check loss inputs every micro-batch (finite, in range); one device sync each.",
}
"""Keys a loss section holds besides the loss's own parameters."""

_REGISTRY: dict[str, type] = {}
C = TypeVar("C", bound=type)


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make the loss class available as ``name``.

    Raises:
        ValueError: ``name`` is taken by another class.
    """

    def add(cls: C) -> C:
        other = _REGISTRY.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            where = f"{other.__module__}.{other.__qualname__}"
            raise ValueError(f"loss {name!r} is already registered by {where}.")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(
                f"register({name!r}): {cls.__qualname__} must be a dataclass (fields: parameters)."
            )
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls
        return cls

    return add


def loss_names() -> tuple[str, ...]:
    """Every loss name known now: the built-ins and whatever was registered."""
    return tuple(dict.fromkeys([*BUILTIN, *_REGISTRY]))


def loss_class(name: str, module: str | None = None) -> type:
    """The class registered as ``name`` (importing ``module`` or the built-in's module first).

    Raises:
        ValueError: an unknown name (listing the known ones), or a module that cannot be imported.
    """
    for source in (module, BUILTIN.get(name)):
        if source and name not in _REGISTRY:
            try:
                importlib.import_module(source)
            except ImportError as exc:
                raise ValueError(f"module={source!r}: cannot be imported ({exc}).") from exc
    if name not in _REGISTRY:
        where = f" (module {module} registers no such loss)" if module else ""
        raise ValueError(f"name={name!r} is not a loss{where}; known: {', '.join(loss_names())}.")
    return _REGISTRY[name]


def parameters(cls: type) -> tuple[str, ...]:
    """The hyper-parameters (dataclass fields) of a loss class."""
    return tuple(f.name for f in dataclasses.fields(cls))


def _owners(key: str) -> list[str]:
    """Built-in losses that take ``key`` as a parameter (for 'misplaced parameter' messages)."""
    out = []
    for name in BUILTIN:
        try:
            if key in parameters(loss_class(name)):
                out.append(name)
        except ValueError:
            continue
    return out


def split_section(section: Mapping[str, Any]) -> tuple[str, str | None, dict[str, Any], dict[str, Any]]:
    """``(name, module, parameters, common settings)`` of a loss section (a mapping of its keys)."""
    params = {k: v for k, v in section.items() if k not in COMMON_KEYS}
    common = {k: v for k, v in section.items() if k in COMMON_KEYS and k not in ("name", "module")}
    return str(section.get("name", "")), section.get("module"), params, common


def loss_problems(section: Mapping[str, Any], prefix: str = "loss") -> list[str]:
    """Every problem of a loss section: unknown loss, parameters it does not take (naming the loss
    they belong to), invalid values (the loss's own ``problems()``), bad common settings."""
    name, module, params, common = split_section(section)
    if not name:
        return [f"{prefix}.name: set the loss ({', '.join(loss_names())})."]
    try:
        cls = loss_class(name, module)
    except ValueError as exc:
        return [f"{prefix}.{exc}"]
    out = []
    valid = parameters(cls)
    for key in sorted(set(params) - set(valid)):
        owners = _owners(key)
        belongs = f"; it is a parameter of {', '.join(owners)}" if owners else ""
        out.append(
            f"{prefix}.{key}: not a parameter of loss {name!r}{belongs}. {name} takes: "
            f"{', '.join(valid) or 'no parameters'} (and {', '.join(COMMON_KEYS)})."
        )
    chunk = common.get("chunk_size")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        out.append(f"{prefix}.chunk_size={chunk}: must be an integer >= 1, or null for no chunking.")
    if "validate" in common and not isinstance(common["validate"], bool):
        out.append(f"{prefix}.validate={common['validate']!r}: must be true or false.")
    out.extend(f"{prefix}.{p}" for p in _type_problems(cls, params))
    if out:
        return out
    loss = cls(**_coerced(cls, params))
    return [f"{prefix}.{p}" for p in loss.problems()]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _accepts(value: Any, annotation: Any) -> bool:
    """Whether a YAML / command-line value fits a parameter's annotation (an int for a float)."""
    if annotation is Any:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_accepts(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation this check does not know: the loss's problems() decide


def _type_problems(cls: type, params: Mapping[str, Any]) -> list[str]:
    hints = _field_types(cls)
    return [
        f"{key}={value!r}: expected {getattr(hints[key], '__name__', hints[key])}."
        for key, value in params.items()
        if key in hints and not _accepts(value, hints[key])
    ]


def _coerced(cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """Ints given for float parameters become floats (``tau: 1`` in YAML)."""
    hints = _field_types(cls)
    return {
        k: float(v) if hints.get(k) is float and isinstance(v, int) and not isinstance(v, bool) else v
        for k, v in params.items()
    }


def build_loss(name: str, module: str | None = None, **params: Any) -> Any:
    """The loss called ``name`` with these parameters, e.g. ``build_loss("discord", tau=2.0)``.

    Refuses exactly what a config's loss section refuses (:func:`loss_problems`), with the same
    messages.

    Raises:
        ValueError: every problem at once.
    """
    misplaced = sorted(set(params) & set(COMMON_KEYS))
    if misplaced:
        raise ValueError(f"build_loss: {misplaced} are settings of a loss section, not loss parameters.")
    section = {"name": name, **({"module": module} if module else {}), **params}
    problems = loss_problems(section)
    if problems:
        raise ValueError("; ".join(problems))
    cls = loss_class(name, module)
    return cls(**_coerced(cls, params))


def build_from_section(section: Mapping[str, Any]) -> Any:
    """The loss a config's loss section describes (its common settings are the caller's)."""
    name, module, params, _ = split_section(section)
    return build_loss(name, module, **params)


def requirements_of(section: Mapping[str, Any]) -> LossRequirements:
    """What the loss of a (valid) loss section reads, without building its math."""
    name, module, params, _ = split_section(section)
    cls = loss_class(name, module)
    requirements: LossRequirements = cls(**_coerced(cls, params)).requirements
    return requirements


def label_of(section: Mapping[str, Any]) -> str:
    """A student's label: its ``label``, else its loss name."""
    return str(section.get("label") or section.get("name", ""))
