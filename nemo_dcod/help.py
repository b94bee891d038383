"""``nemo-dcod <stage> --help``: every config key of the stage, with its type, default and docstring.

The schema dataclasses are the documentation: each field's docstring is the string literal below
it, read here from the class's source (Python keeps no such attribute). Loss sections list every
registered loss with its own parameters. Nothing here imports torch or NeMo: help is instant.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any

__all__ = ["field_docs", "stage_help"]

_WIDTH = 100


def _class_node(cls: type) -> tuple[ast.ClassDef, dict[str, str]] | None:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return None
    tree = ast.parse(source)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return None
    annotations = {
        item.target.id: ast.unparse(item.annotation)
        for item in node.body
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
    }
    return node, annotations


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass, from the string literal after each field (and its
    bases', for inherited fields)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        found = _class_node(klass)
        if found is None:
            continue
        body = found[0].body
        for item, after in zip(body, [*body[1:], None], strict=True):
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                text = after.value.value
                if isinstance(text, str):
                    out[item.target.id] = inspect.cleandoc(text)
    return out


def _annotations(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        found = _class_node(klass)
        if found is not None:
            out.update(found[1])
    return out


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _wrap(text: str, indent: int) -> str:
    pad = " " * indent
    return "\n".join(
        textwrap.fill(p, _WIDTH, initial_indent=pad, subsequent_indent=pad) for p in text.split("\n\n")
    )


def _describe(cls: type, prefix: str, lines: list[str]) -> None:
    docs, types = field_docs(cls), _annotations(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = _default(f)
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            lines.append(f"\n{key}:  ({type(default).__name__})")
            section_doc = type(default).__doc__
            if section_doc:
                lines.append(_wrap(inspect.cleandoc(section_doc).split("\n\n")[0], 2))
            _describe(type(default), f"{key}.", lines)
            continue
        choices = f.metadata.get("choices")
        kind = types.get(f.name, "")
        head = f"  {key}: {kind} = {default!r}" + (
            f"  (one of {', '.join(map(str, choices))})" if choices else ""
        )
        lines.append(head)
        if f.name in docs:
            lines.append(_wrap(docs[f.name], 6))
        if f.metadata.get("loss_section"):
            lines.extend(_losses_help(f"{key}[i]" if isinstance(default, list) else key))


def _losses_help(key: str) -> list[str]:
    from nemo_dcod.losses.registry import BUILTIN, COMMON_KEYS, loss_class

    lines = [f"      {key} holds `name` and that loss's parameters; besides them:"]
    lines += [f"        {k}: {doc}" for k, doc in COMMON_KEYS.items() if k != "name"]
    for name in BUILTIN:
        cls = loss_class(name)
        summary = inspect.cleandoc(cls.__doc__ or "").split("\n")[0]
        lines.append(f"      name: {name}  ({summary})")
        docs, types = field_docs(cls), _annotations(cls)
        for f in dataclasses.fields(cls):
            lines.append(f"        {key}.{f.name}: {types.get(f.name, '')} = {f.default!r}")
            if f.name in docs:
                lines.append(_wrap(docs[f.name], 12))
    return lines


def stage_help(stage: str, schema: type, summary: str) -> str:
    """The help of ``nemo-dcod <stage>``: usage, what it does, every key."""
    lines = [f"usage: nemo-dcod {stage} [--config conf/<file>.yaml] [key=value ...]", ""]
    lines.append(_wrap(inspect.cleandoc(schema.__doc__), 0) if schema.__doc__ else f"{stage}: {summary}")
    lines += ["", "config keys (YAML, or key=value on the command line; nested keys with dots):"]
    _describe(schema, "", lines)
    return "\n".join(lines) + "\n"
