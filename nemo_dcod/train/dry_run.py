"""``nemo-dcod train --dry-run``: every check the run applies at start, and the per-GPU memory estimate.

A training job waits in a queue, then refuses its config at start: the dry run refuses it first.
It validates the config as on the job's machine (a bf16 / FP8 / Transformer Engine config as for a
GPU node, anything else as for this machine), against the store it will read (its manifest, or
the store plan that the dry runs of the stages before it wrote, :mod:`nemo_dcod.data.plan`) and
the ``model.init_from`` checkpoint (its recorded config), then prints the layout and the memory
estimate of the attention that will run (:mod:`nemo_dcod.train.memory`). Nothing is built.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nemo_dcod.config import ConfigError
from nemo_dcod.train.config import TrainConfig

__all__ = ["dry_run_train"]


def dry_run_train(cfg: TrainConfig, store_plan: str | None = None, made_later: bool = False) -> int:
    """Validate ``cfg`` as its job would, print the layout and the memory estimate.

    Args:
        cfg: the training config, merged but not yet validated.
        store_plan: a store plan to check against when data.path holds no store yet.
        made_later: the ``model.init_from`` checkpoint is made by an earlier job (``nemo-dcod
            import``): its checks are left to the job (said so), and the architecture is
            model.family/size's.

    Returns:
        0, or 1 when the estimate exceeds the usable memory per GPU (change the layout first).

    Raises:
        ConfigError: every problem of the config, at once.
    """
    from nemo_dcod.train.memory import report_fit, train_estimate
    from nemo_dcod.train.run import gpt_config_of, store_layout

    if made_later and cfg.model.init_from:
        print(
            f"train: model.init_from={cfg.model.init_from} is made by an earlier job (nemo-dcod import): "
            "the checks that read it (vocabulary rows, architecture, family) run there."
        )
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=None))
    gpu_target = cfg.precision.dtype != "fp32" or cfg.precision.fp8 is not None or cfg.model.spec == "te"
    has_gpu = True if gpu_target else None
    problems = cfg.problems(has_gpu=has_gpu, store_plan=store_plan)
    if problems:
        raise ConfigError(problems, "dry run")
    te = cfg.uses_transformer_engine(bool(gpu_target) or _here_has_gpu())
    layout = store_layout(cfg, te, store_plan) if cfg.data.source == "store" else None
    row_length = layout.row_length if layout else None
    gpt_config = gpt_config_of(cfg, seq_length=row_length, use_te=False)  # the numbers only
    p, t = cfg.parallel, cfg.trainer
    attention = {
        None: "synthetic rows",
        "thd": f"packed rows as THD ({row_length}-token rows after padding)",
        "dense_mask": "packed rows with a dense block-diagonal mask",
        "causal": "one document per row",
    }[layout.attention if layout else None]
    store = ""
    if cfg.data.source == "store" and not (Path(str(cfg.data.path)) / "manifest.json").is_file():
        store = f" (store planned by {store_plan})"
    line = (
        f"{cfg.student_family()} {'(from model.init_from)' if cfg.model.init_from else cfg.model.size}, "
        f"{cfg.world_size} ranks = TP {p.tensor_model_parallel_size}"
        f" x PP {p.pipeline_model_parallel_size} x CP {p.context_parallel_size} x DP {cfg.data_parallel_size}"
        f"{' (sequence parallel)' if p.sequence_parallel else ''}, {cfg.data.seq_length}-token rows, "
        f"micro-batch {t.micro_batch_size}, global batch {t.global_batch_size}, "
        f"{cfg.precision.dtype}{' + FP8 ' + str(cfg.precision.fp8) if cfg.precision.fp8 else ''}, "
        f"distributed optimizer {'on' if cfg.use_distributed_optimizer else 'off'}, "
        f"{'Transformer Engine' if te else 'local'} layers, {attention}{store}"
    )
    advice = (
        "more tensor / pipeline parallelism, sequence parallel, a smaller micro-batch, distributed optimizer"
    )
    estimate = train_estimate(cfg, gpt_config, layout.attention if layout else None, te)
    return report_fit("train", line, estimate, advice)


def _here_has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
