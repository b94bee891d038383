"""``nemo-dcod score``: a NeMo 2 checkpoint at any TP x PP x DP, forward only, into the store.

    nemo-dcod score --config conf/score_tiny.yaml
    nemo-dcod score checkpoint=ckpt/teacher store=data/store topk=8 trainer.devices=8 \\
        parallel.tensor_model_parallel_size=8

The stage in four parts: :mod:`~nemo_dcod.score.plan` checks everything and decides the run
(its key, the shards) before any rank starts; :mod:`~nemo_dcod.score.ranks` is one rank's loop
(the checkpoint built and loaded at the plan's TP x PP, Megatron's forward-only schedule over the
store's rows, read as training reads them); :mod:`~nemo_dcod.score.columns` writes each shard's
columns atomically and, at the end, the manifest; :mod:`~nemo_dcod.score.core` is the math (log-probs
and exact, layout-independent top-k from vocab-parallel logits). This module starts the ranks.

**Resume.** A :data:`~nemo_dcod.data.store.SCORING_MARKER` (with the run's key and config) marks the
store incomplete from the first write to the last; a rerun skips every shard already scored with
the key, at any layout.

**Ranks.** Under ``torchrun`` (``RANK`` / ``WORLD_SIZE``) or ``srun`` (``SLURM_PROCID`` /
``SLURM_NTASKS``, with ``MASTER_ADDR`` / ``MASTER_PORT`` from ``launchers/slurm.sh``) every
process is one rank. Otherwise ``trainer.devices`` processes are started on this machine
(:func:`~nemo_dcod.parallel.launch.run_local`), or with one device the run stays in this process.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nemo_dcod.config import to_yaml
from nemo_dcod.data.store import SCORING_MARKER, write_json_atomic
from nemo_dcod.score.columns import WriteHook, clean_temp_files, finish
from nemo_dcod.score.config import ScoreConfig
from nemo_dcod.score.plan import ScoreError, plan_scoring
from nemo_dcod.score.ranks import score_rank

__all__ = ["run_score"]


def run_score(cfg: ScoreConfig, on_write: WriteHook | None = None) -> dict[str, Any]:
    """Score the store of ``cfg`` with its checkpoint (see the module docstring).

    Args:
        cfg: the validated config.
        on_write: called after each step of a shard's write (:mod:`nemo_dcod.score.columns`;
            tests inject faults there). Must be picklable to reach spawned ranks.

    Returns:
        A summary: shards, rows and tokens scored, seconds, tokens per second, the key.

    Raises:
        ScoreError, IncompleteStoreError: bad inputs (see "Checks before any work").
    """
    import torch.distributed as dist

    from nemo_dcod.parallel.launch import launcher_ranks

    launched = launcher_ranks()
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
    if rank == 0:
        clean_temp_files(Path(plan.store))
        marker = {"key": plan.key, "plan": asdict(plan), "config": to_yaml(cfg)}
        write_json_atomic(Path(plan.store) / SCORING_MARKER, marker)
    if launched is not None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(launched[2])
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=launched[1]
        )
        try:
            stats = [score_rank(rank, launched[1], plan, on_write)]
            gathered: list[Any] = [None] * launched[1]
            dist.all_gather_object(gathered, stats[0])
            stats = gathered
        finally:
            dist.destroy_process_group()
    elif cfg.world_size > 1:
        from nemo_dcod.parallel.launch import run_local

        stats = run_local(score_rank, cfg.world_size, plan, on_write)
    else:
        stats = [score_rank(0, 1, plan, on_write)]
    summary: dict[str, Any] = {name: sum(s[name] for s in stats) for name in ("shards", "rows", "tokens")}
    summary["seconds"] = round(time.perf_counter() - start, 3)
    scoring_seconds = max(s["seconds"] for s in stats)
    summary["tokens_per_second"] = (
        round(summary["tokens"] / scoring_seconds, 1) if scoring_seconds > 0 else 0.0
    )
    summary["key"] = plan.key
    if rank == 0:
        finish(plan, cfg)
        print(
            f"score: {cfg.store}: {summary['shards']} shard(s), {summary['rows']} rows, {summary['tokens']} "
            f"tokens scored ({plan.what}, top-{plan.topk}, {plan.checkpoint}); "
            f"{summary['tokens_per_second']:.0f} tokens/s, {summary['seconds']:.1f} s in all"
        )
    return summary
