"""Configuration: dataclasses are the schema, YAML gives values, ``key=value`` overrides the CLI.

    cfg = load_config(TrainConfig, "conf/train_tiny.yaml", ["loss.tau=2.0", "trainer.max_steps=50"])

Unknown keys are errors (with the valid ones listed); values are type-checked by OmegaConf
against the dataclass; after merging, :func:`validate` walks the whole tree, collects every
problem, and raises once with all of them, naming each field the way it is written on the command
line. Each field's docstring (the string literal below it) is what ``nemo-dcod <stage> --help``
prints (:mod:`nemo_dcod.help`). Nothing here imports torch or NeMo.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = ["LOSS_SECTION", "ConfigError", "choice_problems", "load_config", "to_yaml"]


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""

    def __init__(self, problems: Sequence[str], source: str = "config") -> None:
        self.problems = list(problems)
        super().__init__(
            f"{source}: {len(self.problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )


def choice_problems(cfg: Any, prefix: str = "") -> list[str]:
    """Fields declared with ``metadata={"choices": (...)}`` whose value is not one of them.

    OmegaConf cannot type-check ``Literal``; the choices live in the field's metadata instead.
    """
    out = []
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices is not None and value not in choices:
            key = f"{prefix}.{f.name}" if prefix else f.name
            out.append(f"{key}={value!r}: must be one of {', '.join(map(str, choices))}.")
    return out


LOSS_SECTION: dict[str, Any] = {"loss_section": True}
"""Field metadata of a config field that holds one loss section (``{name: discord, tau: 1.0, ...}``):
a mapping, since each loss has its own parameters. :func:`load_config` replaces it, rather than
merges it, when a later layer names another loss; the schema's ``problems()`` validates it with the
loss's own (:func:`~nemo_dcod.losses.registry.loss_problems`)."""


C = TypeVar("C")


def load_config(
    schema: type[C], path: str | Path | None = None, overrides: Sequence[str] = (), check: bool = True
) -> C:
    """Schema defaults <- YAML file <- ``key=value`` overrides, type-checked, then validated.

    ``check=False`` stops after type-checking (to check a GPU recipe on a CPU machine, say).

    Raises:
        ConfigError: unknown keys, wrong types, malformed overrides, or invalid values; all at once
            where they can be collected.
    """
    source = str(path) if path else schema.__name__
    base = OmegaConf.structured(schema)
    layers = []
    problems: list[str] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"{p}: no such file (configs live in conf/)."], source)
        try:
            layers.append(OmegaConf.load(p))
        except Exception as exc:  # YAML syntax errors come in several types
            raise ConfigError([f"{p}: not valid YAML: {exc}"], source) from exc
    bad = [o for o in overrides if "=" not in o]
    problems.extend(f"override {o!r}: expected key=value" for o in bad)
    good = [o for o in overrides if "=" in o]
    if good:
        try:
            layers.append(OmegaConf.from_dotlist(list(good)))
        except OmegaConfBaseException as exc:
            problems.append(f"overrides: {exc}")
    for layer in layers:
        problems.extend(_unknown_keys(base, layer, schema, drop=True))
    _replace_renamed_loss_sections(base, layers, schema)
    # Merge what is left; a value of the wrong type is reported, dropped, and the merge retried,
    # so that one run reports every problem (unknown keys, types, then values) at once.
    merged = None
    for _ in range(64):
        try:
            merged = OmegaConf.merge(base, *layers)
            break
        except OmegaConfBaseException as exc:
            problems.append(_omegaconf_message(exc))
            if not _drop(layers, getattr(exc, "full_key", None)):
                break
    if merged is None:
        raise ConfigError(problems, source)
    cfg: Any = OmegaConf.to_object(merged)
    if check and hasattr(cfg, "problems"):
        problems.extend(cfg.problems())
    if problems:
        raise ConfigError(problems, source)
    result: C = cfg
    return result


def _replace_renamed_loss_sections(base: Any, layers: list[Any], schema: type) -> None:
    """Loss sections (:data:`LOSS_SECTION`) are replaced, not merged, when a later layer (a YAML file,
    then the overrides) names another loss: ``loss.name=sft`` over a DisCorD section drops
    DisCorD's parameters instead of handing them to SFT."""
    if not dataclasses.is_dataclass(schema):
        return
    for f in dataclasses.fields(schema):
        current = OmegaConf.select(base, f.name)
        if f.metadata.get("loss_section") and OmegaConf.is_dict(current):  # a list: replaced whole anyway
            name = current.get("name")
            for layer in layers:
                section: Any = layer.get(f.name) if OmegaConf.is_dict(layer) else None
                if not OmegaConf.is_dict(section) or "name" not in section:
                    continue
                if name is not None and section["name"] != name:
                    setattr(base, f.name, {})  # the new loss starts from its own defaults
                    for earlier in layers[: layers.index(layer)]:
                        if OmegaConf.is_dict(earlier) and f.name in earlier:
                            del earlier[f.name]
                name = section["name"]


def _drop(layers: list[Any], key: str | None) -> bool:
    """Remove dotted ``key`` from every layer holding it; False if it cannot be found."""
    if not key:
        return False
    found = False
    for layer in layers:
        node = layer
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if OmegaConf.is_dict(node) else None
        if OmegaConf.is_dict(node) and parts[-1] in node:
            del node[parts[-1]]
            found = True
    return found


def _unknown_keys(base: Any, layer: Any, schema: type, prefix: str = "", drop: bool = False) -> list[str]:
    out: list[str] = []
    if not OmegaConf.is_dict(layer):
        return out
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    unknown: list[Any] = []
    for key in layer:
        full = f"{prefix}{key}"
        if key not in fields:
            out.append(f"{full}: unknown key; valid keys here: {', '.join(sorted(fields))}.")
            unknown.append(key)
            continue
        sub = getattr(base, str(key), None)
        if OmegaConf.is_dict(sub) and OmegaConf.is_dict(layer[key]):
            sub_schema = OmegaConf.get_type(sub)
            if sub_schema is not None and dataclasses.is_dataclass(sub_schema):  # not a free mapping
                out.extend(_unknown_keys(sub, layer[key], sub_schema, prefix=f"{full}.", drop=drop))
    if drop:
        for key in unknown:
            del layer[key]
    return out


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def to_yaml(cfg: Any) -> str:
    """The resolved configuration as YAML (what rank 0 writes into the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
