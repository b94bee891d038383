"""``nemo-dcod score --dry-run``: every check score applies at start, and the per-GPU memory estimate.

Scoring a store with a 70B teacher holds a node for hours; a run that would refuse its inputs
at start is refused here first, from the login node: the config, the store (its manifest, or the
store plan the dry runs before it wrote, :mod:`nemo_dcod.data.plan`), and the checkpoint (its
recorded config and tokenizer: the same checks as the run, :func:`~nemo_dcod.score.plan.plan_scoring`,
when the store exists). With ``--store-plan`` it adds the columns it will write to the plan, for
``train``'s dry run. The memory estimate models the attention that will run: Transformer
Engine's fused kernels on THD rows, or the local layers' unfused scores and resident masks.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from nemo_dcod.config import ConfigError
from nemo_dcod.score.config import ScoreConfig

__all__ = ["dry_run_score"]


def dry_run_score(cfg: ScoreConfig, store_plan: str | None = None, made_later: bool = False) -> int:
    """Validate ``cfg`` as score would at start; update the store plan; print the estimate.

    Args:
        cfg: the score config, merged but not yet validated.
        store_plan: the store plan to check against when the store does not exist yet, and to
            add this scoring's columns to.
        made_later: the checkpoint is made by an earlier job (``nemo-dcod import``): the checks
            that read it, and the estimate, are left to the job (said so).

    Returns:
        0, or 1 when the estimate exceeds the usable memory per GPU.

    Raises:
        ConfigError: every problem found, at once.
    """
    from nemo_dcod.data.plan import store_facts, write_plan

    gpu_target = cfg.dtype == "bf16" or cfg.spec == "te"
    problems = cfg.problems(has_gpu=True if gpu_target else None)
    facts = None
    try:
        facts = store_facts(cfg.store, store_plan)
    except ValueError as exc:
        problems.append(f"store={cfg.store}: {exc}")
    if facts is not None and cfg.topk > facts.vocab_size:
        problems.append(f"topk={cfg.topk}: larger than the store's {facts.vocab_size}-token vocabulary.")
    if facts is not None and facts.teacher_logprobs == "generation" and not cfg.overwrite:
        problems.append(
            f"store={cfg.store} {'has' if 'manifest' in facts.source else 'will have'} the generation "
            "engine's teacher log-probs: set overwrite=true to replace them with this model's."
        )
    if problems:
        raise ConfigError(problems, "dry run")
    assert facts is not None
    if store_plan:
        write_plan(
            store_plan, facts.with_scoring(cfg.what, cfg.topk, f"nemo-dcod score --dry-run ({cfg.store})")
        )
        print(f"score: store plan {store_plan} now lists this scoring's columns (top-{cfg.topk})")
    if made_later:
        print(
            f"score: checkpoint={cfg.checkpoint} is made by an earlier job (nemo-dcod import): the checks "
            "that read it (tokenizer, vocabulary rows, layout) and the memory estimate run in the job."
        )
        return 0
    checkpoint, config = _checkpoint_config(cfg, facts.vocab_size)
    te = cfg.spec == "te" or (
        cfg.spec == "auto" and bool(gpu_target) and importlib.util.find_spec("transformer_engine") is not None
    )
    return _estimate(cfg, checkpoint, config, facts.seq_length, te)


def _checkpoint_config(cfg: ScoreConfig, vocab_size: int) -> tuple[Path, Any]:
    """The checkpoint and its recorded model config, after the run's own start checks.

    Raises:
        ConfigError: a missing or unreadable checkpoint, a tokenizer or vocabulary that does not
            match the store's, a layout that does not divide the model.
    """
    from nemo_dcod.data.readers import DataError
    from nemo_dcod.score.plan import plan_scoring, resolve_checkpoint
    from nemo_dcod.train.config import init_checkpoint_config

    problems = []
    try:
        checkpoint = resolve_checkpoint(cfg.checkpoint)
    except DataError as exc:
        raise ConfigError([str(exc)], "dry run") from exc
    if (Path(cfg.store) / "manifest.json").is_file():
        try:
            plan_scoring(cfg)  # what the run checks before any work: tokenizers, rows, overwrite
        except DataError as exc:
            problems.append(str(exc))
    else:  # only a plan: the vocabulary's size against the checkpoint's rows
        rows = int(init_checkpoint_config(str(checkpoint)).get("vocab_size") or 0)
        tp = cfg.parallel.tensor_model_parallel_size
        if rows < vocab_size:
            problems.append(
                f"checkpoint={checkpoint}: {rows} output rows for a {vocab_size}-token vocabulary."
            )
        if rows % tp:
            problems.append(
                f"parallel.tensor_model_parallel_size={tp} does not divide the {rows} vocabulary rows of "
                f"checkpoint={checkpoint}: pick a TP that divides it."
            )
    from nemo.lightning import io

    try:
        config = io.load_context(str(checkpoint), subpath="model").config
    except Exception as exc:  # a context of another NeMo version, a truncated file, ...
        problems.append(f"checkpoint={checkpoint}: its context/ cannot be read: {exc}")
        config = None
    if problems:
        raise ConfigError(problems, "dry run")
    return checkpoint, config


def _estimate(cfg: ScoreConfig, checkpoint: Path, config: Any, seq_length: int, te: bool) -> int:
    from nemo_dcod.train.memory import Architecture, Layout, forward_memory, report_fit

    p = cfg.parallel
    arch = Architecture.of(config)
    shape = (arch.num_layers, arch.num_attention_heads, arch.num_query_groups)
    layout_problems = p.problems(cfg.world_size, shape, forward_only=True)
    if layout_problems:
        raise ConfigError(layout_problems, "dry run")
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "checkpoint" and "bfloat16" in str(config.params_dtype))
    t = cfg.trainer
    layout = Layout(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        data_parallel_size=cfg.data_parallel_size,
        # THD: a micro-batch's rows are one packed sequence, with no [S, S] scores or masks.
        seq_length=seq_length,
        micro_batch_size=t.micro_batch_size,
        bf16=bf16,
        fused_attention=te,
        loss_chunk_rows=cfg.chunk_size,
        resident_mask_rows=0 if te else t.micro_batches_per_call * t.micro_batch_size,
    )
    line = (
        f"{checkpoint} ({arch.total_parameters() / 1e9:.2f}B parameters), {cfg.world_size} ranks = "
        f"TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size} "
        f"x DP {cfg.data_parallel_size}, {seq_length}-token rows, micro-batch {t.micro_batch_size}, "
        f"{'bf16' if bf16 else 'fp32'}, "
        + (
            "Transformer Engine layers, packed rows as THD"
            if te
            else "local layers, dense block-diagonal masks"
        )
    )
    advice = "more tensor / pipeline parallelism or a smaller micro-batch"
    return report_fit("score", line, forward_memory(arch, layout), advice)
