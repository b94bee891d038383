"""Token -> id maps of tokenizers on disk, and how two of them differ (no torch, no transformers).

Stored token ids mean something only under the tokenizer that wrote them: ``score`` checks the
scored model's tokenizer against the store's, and ``train`` a ``model.init_from`` checkpoint's
(``context/nemo_tokenizer``) against it. Only the id -> token maps matter (added and special tokens
included); how text is split into them is not the consumer's business.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["checkpoint_tokenizer_dir", "tokenizer_vocab", "vocabulary_diff"]


def tokenizer_vocab(directory: str | Path) -> dict[str, int]:
    """The token -> id map (added tokens included) of the ``tokenizer.json`` in ``directory``.

    Raises:
        ValueError: no readable ``tokenizer.json`` there.
    """
    from tokenizers import Tokenizer

    path = Path(directory) / "tokenizer.json"
    try:
        vocab: dict[str, int] = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as exc:  # the Rust library raises its own exception types
        raise ValueError(f"{path}: not a readable tokenizer ({exc}).") from exc
    return vocab


def checkpoint_tokenizer_dir(checkpoint: str | Path) -> Path | None:
    """A NeMo 2 checkpoint's Hugging Face tokenizer folder (``context/nemo_tokenizer``), if it has one."""
    where = Path(checkpoint) / "context" / "nemo_tokenizer"
    return where if (where / "tokenizer.json").is_file() else None


def vocabulary_diff(store_vocab: dict[str, int], model_vocab: dict[str, int], limit: int = 5) -> list[str]:
    """Short description of how two token -> id maps differ; ``[]`` when they are equal.

    Args:
        store_vocab, model_vocab: token -> id of each side (added tokens included).
        limit: ids shown.
    """
    store_ids = {i: t for t, i in store_vocab.items()}
    model_ids = {i: t for t, i in model_vocab.items()}
    if store_ids == model_ids:
        return []
    lines = [f"sizes: {len(store_ids)} tokens (store) vs {len(model_ids)} (model)"]
    differ = sorted(i for i in store_ids.keys() | model_ids.keys() if store_ids.get(i) != model_ids.get(i))
    lines.append(f"{len(differ)} id(s) map to different tokens, e.g.:")
    for i in differ[:limit]:
        lines.append(
            f"  id {i}: {store_ids.get(i, '<none>')!r} (store) vs {model_ids.get(i, '<none>')!r} (model)"
        )
    return lines
