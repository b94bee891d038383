"""``nemo-dcod score``, before any work: the checks, and the plan every rank follows.

**Checks before any work.** The store is complete; the scored model's tokenizer maps every id to
the token the store's tokenizer does (a mismatch is an error with a short diff); the model has
room for the vocabulary and TP divides its rows; TP x PP divides its heads, query groups and layers
(before the run marks the store); the store holds no teacher columns from elsewhere
(generation log-probs, another model) unless ``overwrite=true``.

**The key.** The run's key hashes the store's key, the checkpoint's content identity (its
``context/model.yaml`` and ``weights/.metadata``) and the settings that change the values (what,
topk, dtype), not the layout: a requeued run at another TP/PP resumes where the last one stopped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_dcod.data.readers import DataError
from nemo_dcod.data.store import SCORING_MARKER, PackedStore
from nemo_dcod.data.vocab import vocabulary_diff
from nemo_dcod.score.config import ScoreConfig

__all__ = [
    "ROW_INPUTS",
    "ScoreError",
    "ScorePlan",
    "checkpoint_identity",
    "plan_scoring",
    "resolve_checkpoint",
    "vocabulary_diff",
]

ROW_INPUTS = ("tokens", "loss_mask", "segment_ids")
"""The store columns scoring reads."""


class ScoreError(DataError):
    """A user error of ``nemo-dcod score``: bad checkpoint, store, tokenizer or layout."""


@dataclass
class ScorePlan:
    """What every rank needs to know, decided once before the ranks start."""

    key: str
    checkpoint: str
    store: str
    vocab_size: int
    shards: list[str]
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    micro_batch_size: int
    micro_batches_per_call: int
    topk: int
    what: str
    dtype: str
    chunk_size: int | None
    seed: int
    spec: str = "auto"


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def resolve_checkpoint(path: str) -> Path:
    """``path`` itself when it is a NeMo 2 checkpoint, else the newest complete one inside it.

    Raises:
        ScoreError: neither.
    """
    from nemo_dcod.train.checkpoints import checkpoint_problem, newest_complete_checkpoint

    where = Path(path)
    if (where / "context").is_dir():
        problem = checkpoint_problem(where)
        if problem is not None:
            raise ScoreError(f"checkpoint={path}: not a complete NeMo 2 checkpoint ({problem}).")
        return where.resolve()
    newest = newest_complete_checkpoint(where) if where.is_dir() else None
    if newest is None:
        raise ScoreError(
            f"checkpoint={path}: not a NeMo 2 checkpoint (no context/) nor a folder holding a complete one; "
            "`nemo-dcod import --hf DIR --out DIR` makes one from a Hugging Face model."
        )
    return newest.resolve()


def checkpoint_identity(checkpoint: Path) -> str:
    """sha256 of what decides the checkpoint's function: its model config and its weights' metadata
    (tensor names, shapes and the files' layout; a re-save of other weights changes it)."""
    h = hashlib.sha256()
    for name in ("context/model.yaml", "weights/.metadata", "weights/metadata.json"):
        file = checkpoint / name
        if file.is_file():
            h.update(name.encode() + b"\0" + file.read_bytes())
    return h.hexdigest()


def _model_tokenizer(cfg: ScoreConfig, checkpoint: Path) -> tuple[Any, int]:
    """The scored model's HF tokenizer and its output rows (padded vocabulary)."""
    from nemo.lightning import io

    from nemo_dcod.train.config import init_checkpoint_config

    rows = int(init_checkpoint_config(str(checkpoint))["vocab_size"])
    if cfg.tokenizer is not None:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(cfg.tokenizer), rows
        except Exception as exc:  # OSError, ValueError, ... for a bad directory
            raise ScoreError(
                f"tokenizer={cfg.tokenizer}: cannot load a Hugging Face tokenizer: {exc}"
            ) from exc
    tokenizer = io.load_context(str(checkpoint), subpath="model").tokenizer
    if tokenizer is None:
        raise ScoreError(
            f"checkpoint={checkpoint} carries no tokenizer (trained from scratch?): set tokenizer= to the "
            "model's Hugging Face tokenizer directory."
        )
    return getattr(tokenizer, "tokenizer", tokenizer), rows


def _check_vocabulary(cfg: ScoreConfig, manifest: dict[str, Any], checkpoint: Path) -> int:
    """The real vocabulary size, after checking that the model's tokenizer is the store's.

    Only the id -> token maps matter here (the stored ids are fixed; how text was split into them
    is not the scored model's business), compared with added and special tokens.

    Raises:
        ScoreError: the store's tokenizer is gone, the maps differ (with a short diff), the model
            has fewer output rows than tokens, or TP does not divide them.
    """
    store_tok_path = manifest["tokenizer"]["path"]
    if not Path(store_tok_path, "tokenizer.json").is_file():
        raise ScoreError(
            f"store={cfg.store}: its tokenizer {store_tok_path} (recorded by prepare) is gone; put it back "
            "or re-run prepare."
        )
    from transformers import PreTrainedTokenizerFast

    store_tok = PreTrainedTokenizerFast.from_pretrained(store_tok_path)
    model_tok, rows = _model_tokenizer(cfg, checkpoint)
    diff = vocabulary_diff(store_tok.get_vocab(), model_tok.get_vocab())
    if diff:
        source = cfg.tokenizer or f"{checkpoint}/context"
        raise ScoreError(
            f"the scored model's vocabulary ({source}) is not the store's ({store_tok_path}): token ids "
            "would mean other tokens.\n  " + "\n  ".join(diff) + "\nScore with a model of the student's "
            "tokenizer; without one, score the student's own initial checkpoint (what=reference)."
        )
    vocab = int(manifest["vocab_size"])
    tp = cfg.parallel.tensor_model_parallel_size
    if rows < vocab:
        raise ScoreError(f"checkpoint={checkpoint}: {rows} output rows for a {vocab}-token vocabulary.")
    if rows % tp:
        raise ScoreError(
            f"parallel.tensor_model_parallel_size={tp} does not divide the {rows} vocabulary rows of "
            f"checkpoint={checkpoint}: pick a TP that divides it."
        )
    return vocab


def _check_layout(cfg: ScoreConfig, checkpoint: Path) -> None:
    """TP x PP must divide the checkpoint's heads, query groups and layers (its recorded config):
    checked here, before the run marks the store, so that a layout Megatron would refuse with an
    assertion inside every rank leaves the store as it was.

    Raises:
        ScoreError: every clash, naming the fields.
    """
    from nemo_dcod.train.config import init_checkpoint_config

    try:
        config = init_checkpoint_config(str(checkpoint))
        heads = int(config["num_attention_heads"])
        shape = (int(config["num_layers"]), heads, int(config.get("num_query_groups") or heads))
    except (ValueError, KeyError, TypeError) as exc:
        raise ScoreError(f"checkpoint={checkpoint}: its model config cannot be read: {exc}") from exc
    problems = cfg.parallel.problems(cfg.world_size, shape, forward_only=True)
    if problems:
        raise ScoreError(
            f"checkpoint={checkpoint} ({shape[0]} layers, {shape[1]} heads, {shape[2]} query groups) "
            "cannot be scored at this layout:\n  " + "\n  ".join(problems)
        )


def plan_scoring(cfg: ScoreConfig) -> ScorePlan | None:
    """Check everything, and decide the run; None when the store already holds this scoring.

    Raises:
        ScoreError: see the module docstring ("Checks before any work").
        IncompleteStoreError: the store is not complete (prepare did not finish).
    """
    store = PackedStore(cfg.store, columns=ROW_INPUTS, scoring=True)
    manifest = store.manifest
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    vocab = _check_vocabulary(cfg, manifest, checkpoint)
    _check_layout(cfg, checkpoint)
    if cfg.topk > vocab:
        raise ScoreError(f"topk={cfg.topk}: larger than the {vocab}-token vocabulary.")
    key = _sha(
        {
            "store": manifest["key"],
            "checkpoint": checkpoint_identity(checkpoint),
            "settings": cfg.content_settings(),
        }
    )
    marker = Path(cfg.store) / SCORING_MARKER
    unfinished = json.loads(marker.read_text()).get("key") if marker.is_file() else None
    teacher = manifest.get("teacher") or {}
    if unfinished is None and teacher.get("key") == key:
        return None
    if not cfg.overwrite:
        if unfinished is not None and unfinished != key:
            raise ScoreError(
                f"store={cfg.store}: an unfinished scoring run with another checkpoint or settings "
                f"({marker}): finish it (re-run that command), or set overwrite=true to replace it."
            )
        if unfinished is None and teacher.get("logprobs") is not None:
            raise ScoreError(
                f"store={cfg.store} already has teacher log-probs ({teacher.get('logprobs')}"
                f"{', ' + str(teacher.get('checkpoint')) if teacher.get('checkpoint') else ''}): set "
                "overwrite=true to replace them with this model's."
            )
    return ScorePlan(
        key=key,
        checkpoint=str(checkpoint),
        store=str(Path(cfg.store).resolve()),
        vocab_size=vocab,
        shards=list(store.shards),
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        micro_batch_size=cfg.trainer.micro_batch_size,
        micro_batches_per_call=cfg.trainer.micro_batches_per_call,
        topk=cfg.topk,
        what=cfg.what,
        dtype=cfg.dtype,
        chunk_size=cfg.chunk_size,
        seed=cfg.seed,
        spec=cfg.spec,
    )
