"""``nemo-dcod score``: a NeMo 2 checkpoint at any TP x PP x DP, forward only, into the store.

    nemo-dcod score --config conf/score_tiny.yaml
    nemo-dcod score checkpoint=ckpt/teacher store=data/store topk=8 trainer.devices=8 \\
        parallel.tensor_model_parallel_size=8

The model is the checkpoint's, built and loaded as every other stage builds it
(:func:`~nemo_dcod.convert.verify.load_nemo_model`: NeMo's config, megatron-core's ``GPTModel``,
distributed checkpointing resharding the stored TP/PP), and run by Megatron's forward-only
schedule: no optimizer state, no gradients. Rows are read exactly as training reads them
(:func:`~nemo_dcod.data.store.collate_packed`: block-diagonal causal mask, position ids restarting
per document), so a packed document is scored as if it were alone. Columns:
:mod:`nemo_dcod.score.core`.

**Checks before any work.** The store is complete; the scored model's tokenizer maps every id to
the token the store's tokenizer does (a mismatch is an error with a short diff); the model has
room for the vocabulary and TP divides its rows; the store holds no teacher columns from elsewhere
(generation log-probs, another model) unless ``overwrite=true``.

**Resume.** The run's *key* hashes the store's key, the checkpoint's content identity (its
``context/model.yaml`` and ``weights/.metadata``) and the settings that change the values (what,
topk, dtype), not the layout. A :data:`~nemo_dcod.data.store.SCORING_MARKER` in the store marks
it incomplete from the first write to the last. Data-parallel replica ``r`` of ``DP`` scores the
shards ``i`` with ``i % DP == r``; per shard its last pipeline stage's TP rank 0 writes each
column to a temp file, renames it into place, then writes ``score.json`` with the key. A rerun
skips every shard whose ``score.json`` has the key. When all have it, rank 0 writes the manifest
(with the new columns and the scoring's provenance), then removes the marker.

**Ranks.** Under ``torchrun`` (``RANK`` / ``WORLD_SIZE``) or ``srun`` (``SLURM_PROCID`` /
``SLURM_NTASKS``, with ``MASTER_ADDR`` / ``MASTER_PORT`` from ``launchers/slurm.sh``) every
process is one rank. Otherwise ``trainer.devices`` processes are started on this machine
(:func:`~nemo_dcod.parallel.launch.run_local`), or with one device the run stays in this process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nemo_dcod.data.readers import DataError
from nemo_dcod.data.store import SCORING_MARKER, PackedStore, read_manifest, write_json_atomic
from nemo_dcod.score.config import ScoreConfig

__all__ = [
    "ScoreError",
    "ScorePlan",
    "micro_batches_of",
    "plan_scoring",
    "run_score",
    "uses_transformer_engine",
    "vocabulary_diff",
]

ROW_INPUTS = ("tokens", "loss_mask", "segment_ids")
KILL_AFTER_ENV = "NEMO_DCOD_SCORE_KILL_AFTER_SHARDS"
"""Fault injection for the resume tests: a writer rank SIGKILLs itself after this many shards."""


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


# --------------------------------------------------------------------------- checks


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


def vocabulary_diff(store_vocab: dict[str, int], model_vocab: dict[str, int], limit: int = 5) -> list[str]:
    """Short description of how two token -> id maps differ; ``[]`` when they are equal.

    Args:
        store_vocab, model_vocab: ``tokenizer.get_vocab()`` of each side (added tokens included).
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


def _shard_done(store: Path, shard: str, key: str, rows: int, seq: int, topk: int) -> bool:
    where = store / "shards" / shard
    try:
        if json.loads((where / "score.json").read_text()).get("key") != key:
            return False
        shapes: dict[str, tuple[int, ...]] = {"teacher_logprobs": (rows, seq)}
        if topk:
            shapes.update(teacher_topk_ids=(rows, seq, topk), teacher_topk_logprobs=(rows, seq, topk))
        return all(np.load(where / f"{n}.npy", mmap_mode="r").shape == s for n, s in shapes.items())
    except (OSError, ValueError):
        return False


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


# --------------------------------------------------------------------------- the ranks


def micro_batches_of(
    store: PackedStore, rows: range, micro_batch_size: int, device: Any, thd: bool = False
) -> list[dict[str, Any]]:
    """Rows of ``store``, ``micro_batch_size`` at a time (the last one smaller), on ``device``.

    Dense (``thd=False``): as training batches them for the local layers (:func:`collate_packed`
    with the block-diagonal attention mask). THD (Transformer Engine): no mask; the micro-batch's
    rows run as one packed sequence, each document (and padding run) one sequence of it
    (``cu_seqlens`` over the ``B·S`` flattened tokens, ``max_seqlen`` on the host).
    """
    import torch

    from nemo_dcod.data.store import collate_packed, cu_seqlens

    out = []
    for lo in range(rows.start, rows.stop, micro_batch_size):
        batch = collate_packed([store[i] for i in range(lo, min(lo + micro_batch_size, rows.stop))], not thd)
        moved = {k: v.to(device) for k, v in batch.items()}
        if thd:
            cu = cu_seqlens(batch["segment_ids"])
            moved["cu_seqlens"] = cu[None].to(device)
            moved["max_seqlen"] = torch.diff(cu).max().to(torch.int64).view(1)  # host
        out.append(moved)
    return out


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _score_shard(
    mcore: Any, store: PackedStore, k: int, plan: ScorePlan, device: Any, thd: bool
) -> dict[str, Any] | None:
    """Score shard ``k``; on the writer rank its columns (numpy), else None."""
    from nemo_dcod.score.core import score_micro_batches

    mbs = plan.micro_batch_size
    first, last = int(store.offsets[k]), int(store.offsets[k + 1])
    full_end = first + (last - first) // mbs * mbs
    # Rows are collated a window at a time (a [B, 1, S, S] mask is 64 MiB per row at S = 8192; a
    # shard holds thousands of rows), each window one forward-only schedule call of
    # `micro_batches_per_call` micro-batches; one batch shape per call (p2p buffers are sized per
    # call): full micro-batches, then the short rest.
    window = plan.micro_batches_per_call * mbs
    spans = [(lo, min(lo + window, full_end)) for lo in range(first, full_end, window)]
    if full_end < last:
        spans.append((full_end, last))
    scored = []
    for lo, hi in spans:
        scored.extend(
            score_micro_batches(
                mcore,
                micro_batches_of(store, range(lo, hi), mbs, device, thd=thd),
                vocab_size=plan.vocab_size,
                topk=plan.topk,
                chunk_size=plan.chunk_size,
            )
        )
    if not scored:
        return None
    columns = {"teacher_logprobs": np.concatenate([s.logprobs.numpy() for s in scored])}
    if plan.topk:
        columns["teacher_topk_ids"] = np.concatenate(
            [s.topk_ids.numpy() for s in scored if s.topk_ids is not None]
        )
        columns["teacher_topk_logprobs"] = np.concatenate(
            [s.topk_logprobs.numpy() for s in scored if s.topk_logprobs is not None]
        )
    return columns


def _write_shard_columns(where: Path, columns: dict[str, np.ndarray], info: dict[str, Any]) -> None:
    """Each column to a temp file renamed into place, then ``score.json`` last."""
    (where / "score.json").unlink(missing_ok=True)  # until the new columns are all in place
    for name, array in columns.items():
        _save_atomic(where / f"{name}.npy", array)
    write_json_atomic(where / "score.json", info)


def uses_transformer_engine(spec: str) -> bool:
    """Whether ``spec`` (auto | local | te) builds Transformer Engine layers on this machine.

    Raises:
        ScoreError: spec=te where TE cannot be imported.
    """
    from nemo_dcod.model.families import have_transformer_engine

    if spec == "local":
        return False
    if spec == "te" and not have_transformer_engine():
        raise ScoreError(
            "spec=te: Transformer Engine cannot be imported here (pip install -e '.[gpu]'); use spec=local."
        )
    return have_transformer_engine()


def score_rank(rank: int, world: int, plan: ScorePlan) -> dict[str, Any]:
    """One rank's share of the run (every rank of the job calls it; a process group exists).

    Returns:
        ``{"shards": n, "rows": n, "tokens": n, "seconds": s}`` written by this rank (zeros on a rank
        that writes nothing).
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_dcod.convert.verify import load_nemo_model, megatron_parallel
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode

    del rank, world
    enable_cpu_mode()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "checkpoint": None}[plan.dtype]
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    store = PackedStore(plan.store, columns=ROW_INPUTS, scoring=True)
    seq = store.seq_length
    stats = {"shards": 0, "rows": 0, "tokens": 0, "seconds": 0.0}
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    with megatron_parallel(plan.tensor_model_parallel_size, plan.pipeline_model_parallel_size, plan.seed):
        dp_rank = parallel_state.get_data_parallel_rank()
        dp = parallel_state.get_data_parallel_world_size()
        writer = (
            parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        )
        mine = [
            k
            for k, name in enumerate(plan.shards)
            if k % dp == dp_rank
            and not _shard_done(
                Path(plan.store), name, plan.key, int(store.offsets[k + 1] - store.offsets[k]), seq, plan.topk
            )
        ]
        # Every rank of a replica must run the same micro-batches: decide before anyone writes.
        dist.barrier()
        # Transformer Engine's layers take packed rows as THD (each document its own sequence);
        # the local layers take the block-diagonal mask, which their unfused softmax applies.
        te = uses_transformer_engine(plan.spec)
        mcore, _ = load_nemo_model(Path(plan.checkpoint), dtype, local_spec=not te)
        start = time.perf_counter()
        for k in mine:
            shard_start = time.perf_counter()
            columns = _score_shard(mcore, store, k, plan, device, te)
            if writer:
                assert columns is not None  # the last stage has the columns
                rows = int(store.offsets[k + 1] - store.offsets[k])
                tokens = int((store.shard_column(k, "segment_ids") >= 0).sum())
                info = {
                    "key": plan.key,
                    "rows": rows,
                    "topk": plan.topk,
                    "what": plan.what,
                    "written_by": {"data_parallel_rank": dp_rank, "data_parallel_size": dp},
                }
                _write_shard_columns(Path(plan.store) / "shards" / plan.shards[k], columns, info)
                stats["shards"] += 1
                stats["rows"] += rows
                stats["tokens"] += tokens
                print(
                    f"score: {plan.shards[k]}: {rows} rows, {tokens} tokens in "
                    f"{time.perf_counter() - shard_start:.1f} s (data-parallel rank {dp_rank} of {dp})",
                    flush=True,
                )
                if kill_after and stats["shards"] >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # fault injection: see KILL_AFTER_ENV
        stats["seconds"] = time.perf_counter() - start
        del mcore
        dist.barrier()
    return stats


# --------------------------------------------------------------------------- the stage


def _finish(plan: ScorePlan, cfg: ScoreConfig) -> dict[str, Any]:
    """Check every shard has this run's columns, then the manifest, then remove the marker."""
    store_path = Path(plan.store)
    manifest = read_manifest(store_path, scoring=True)
    seq = int(manifest["seq_length"])
    missing = [
        s["name"]
        for s in manifest["shards"]
        if not _shard_done(store_path, s["name"], plan.key, int(s["rows"]), seq, plan.topk)
    ]
    if missing:
        raise ScoreError(
            f"store={cfg.store}: {len(missing)} shard(s) lack this run's columns after scoring "
            f"({missing[:3]}): re-run the same command."
        )
    rows = int(manifest["counts"]["rows"])
    columns = dict(manifest["columns"])
    columns["teacher_logprobs"] = {"dtype": "float32", "shape": [rows, seq]}
    for name, dtype in (("teacher_topk_ids", "int32"), ("teacher_topk_logprobs", "float32")):
        columns[name] = {"dtype": dtype, "shape": [rows, seq, plan.topk]} if plan.topk else None
    manifest["columns"] = columns
    manifest["teacher"] = {
        "logprobs": plan.what,
        "topk": plan.topk,
        "checkpoint": plan.checkpoint,
        "checkpoint_identity": checkpoint_identity(Path(plan.checkpoint)),
        "dtype": plan.dtype,
        "key": plan.key,
    }
    write_json_atomic(store_path / "manifest.json", manifest)
    (store_path / SCORING_MARKER).unlink(missing_ok=True)
    PackedStore(store_path)  # what training will open: complete, every column as listed
    return manifest


def _launcher_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun or srun, or None when started plainly."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return None


def _clean_temp_files(store: Path) -> None:
    for stale in (store / "shards").glob("*/.*.tmp"):
        stale.unlink(missing_ok=True)  # left by a killed run


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """Score the store of ``cfg`` with its checkpoint (see the module docstring).

    Returns:
        A summary: shards, rows and tokens scored, seconds, tokens per second, the key.

    Raises:
        ScoreError, IncompleteStoreError: bad inputs (see "Checks before any work").
    """
    import torch.distributed as dist

    launched = _launcher_ranks()
    rank = launched[0] if launched else 0
    if launched is not None and launched[1] != cfg.world_size:
        raise ScoreError(
            f"the launcher started {launched[1]} ranks but trainer.devices x trainer.num_nodes = "
            f"{cfg.world_size}: set them to match."
        )
    start = time.perf_counter()
    plan = plan_scoring(cfg)
    if plan is None:
        if rank == 0:
            print(f"score: {cfg.store} already holds this scoring ({cfg.checkpoint}); nothing to do.")
        return {"shards": 0, "rows": 0, "tokens": 0, "seconds": 0.0, "done": True}
    command = (
        " ".join(["nemo-dcod", "score", *sys.argv[2:]]) if "score" in sys.argv[1:2] else "nemo-dcod score"
    )
    if rank == 0:
        _clean_temp_files(Path(plan.store))
        write_json_atomic(
            Path(plan.store) / SCORING_MARKER, {"key": plan.key, "command": command, "plan": asdict(plan)}
        )
    if launched is not None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(launched[2])
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=launched[1]
        )
        try:
            stats = [score_rank(rank, launched[1], plan)]
            gathered: list[Any] = [None] * launched[1]
            dist.all_gather_object(gathered, stats[0])
            stats = gathered
        finally:
            dist.destroy_process_group()
    elif cfg.world_size > 1:
        from nemo_dcod.parallel.launch import run_local

        stats = run_local(score_rank, cfg.world_size, plan)
    else:
        stats = [score_rank(0, 1, plan)]
    summary: dict[str, Any] = {name: sum(s[name] for s in stats) for name in ("shards", "rows", "tokens")}
    summary["seconds"] = round(time.perf_counter() - start, 3)
    scoring_seconds = max(s["seconds"] for s in stats)
    summary["tokens_per_second"] = (
        round(summary["tokens"] / scoring_seconds, 1) if scoring_seconds > 0 else 0.0
    )
    summary["key"] = plan.key
    if rank == 0:
        _finish(plan, cfg)
        print(
            f"score: {cfg.store}: {summary['shards']} shard(s), {summary['rows']} rows, {summary['tokens']} "
            f"tokens scored ({plan.what}, top-{plan.topk}, {plan.checkpoint}); "
            f"{summary['tokens_per_second']:.0f} tokens/s, {summary['seconds']:.1f} s in all"
        )
    return summary
