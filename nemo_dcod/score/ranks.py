"""One rank of ``nemo-dcod score``: load the model at the plan's layout, score its shards, write them.

Data-parallel replica ``r`` of ``DP`` scores the shards ``i`` with ``i % DP == r``; every rank of a
replica runs the same micro-batches (decided before anyone writes); its last pipeline stage's
tensor-parallel rank 0 writes each shard's columns (:mod:`nemo_dcod.score.columns`). Rows are
read exactly as training reads them (block-diagonal causal mask or THD packs, position ids
restarting per document), so a packed document is scored as if it were alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from nemo_dcod.data.store import PackedStore
from nemo_dcod.parallel.threads import local_ranks, set_cpu_threads
from nemo_dcod.score.columns import WriteHook, shard_done, write_shard_columns
from nemo_dcod.score.plan import ROW_INPUTS, ScoreError, ScorePlan

__all__ = ["micro_batches_of", "score_rank", "uses_transformer_engine"]


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


def _check_columns(columns: dict[str, np.ndarray], store: PackedStore, k: int, shard: str) -> None:
    """A forward that produced no log-probability (NaN, inf: an overflow in bf16, a bad checkpoint)
    is refused here, naming the shard and row, not at training time.

    Raises:
        ScoreError: the first bad value at a trained position.
    """
    from nemo_dcod.data.store import first_bad_logprob

    trained = np.asarray(store.shard_column(k, "loss_mask")) > 0
    for name in ("teacher_logprobs", "teacher_topk_logprobs"):
        if name in columns and (bad := first_bad_logprob(columns[name], trained)) is not None:
            at, value = bad
            raise ScoreError(
                f"{shard}: the scored model gave {name} = {value} at row {at[0]}, position {at[1]} (a "
                "trained position): not a log-probability. Check the checkpoint, or score with dtype=fp32."
            )


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


def score_rank(rank: int, world: int, plan: ScorePlan, on_write: WriteHook | None = None) -> dict[str, Any]:
    """One rank's share of the run (every rank of the job calls it; a process group exists).

    Args:
        rank, world: as :func:`~nemo_dcod.parallel.launch.run_local` passes them (the process
            group tells the rank; the world sizes this rank's share of the CPU threads).
        plan: from :func:`~nemo_dcod.score.plan.plan_scoring`.
        on_write: see :mod:`nemo_dcod.score.columns` (tests).

    Returns:
        ``{"shards": n, "rows": n, "tokens": n, "seconds": s}`` written by this rank (zeros on a rank
        that writes nothing).
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_dcod.model.loading import load_nemo_model, megatron_parallel
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode

    enable_cpu_mode()
    set_cpu_threads(local_ranks(world))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "checkpoint": None}[plan.dtype]
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    store = PackedStore(plan.store, columns=ROW_INPUTS, scoring=True)
    seq = store.seq_length
    stats = {"shards": 0, "rows": 0, "tokens": 0, "seconds": 0.0}
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
            and not shard_done(
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
                _check_columns(columns, store, k, plan.shards[k])
                rows = int(store.offsets[k + 1] - store.offsets[k])
                tokens = int((store.shard_column(k, "segment_ids") >= 0).sum())
                info = {
                    "key": plan.key,
                    "rows": rows,
                    "topk": plan.topk,
                    "what": plan.what,
                    "written_by": {"data_parallel_rank": dp_rank, "data_parallel_size": dp},
                }
                write_shard_columns(Path(plan.store) / "shards" / plan.shards[k], columns, info, on_write)
                stats["shards"] += 1
                stats["rows"] += rows
                stats["tokens"] += tokens
                print(
                    f"score: {plan.shards[k]}: {rows} rows, {tokens} tokens in "
                    f"{time.perf_counter() - shard_start:.1f} s (data-parallel rank {dp_rank} of {dp})",
                    flush=True,
                )
        stats["seconds"] = time.perf_counter() - start
        del mcore
        dist.barrier()
    return stats
