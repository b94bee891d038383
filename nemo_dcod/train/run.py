"""``nemo-dcod train``: a validated :class:`TrainConfig` -> NeMo's trainer, strategy and logger -> fit.

Everything here is assembly of NeMo parts: ``MegatronStrategy`` (TP, SP, PP, virtual PP, CP, DP),
``MegatronMixedPrecision`` (bf16, FP8 through Transformer Engine), ``MegatronOptimizerModule`` with
warm-up + cosine, ``NeMoLogger`` (TensorBoard, ``ModelCheckpoint``), ``AutoResume`` and
``PreemptionCallback`` (SIGTERM and SIGUSR1: checkpoint, then exit 0). Our parts are the model
plug-in (:mod:`nemo_dcod.model`), the data source, the metrics callback, and the choice of the
checkpoint to resume from (:mod:`nemo_dcod.train.checkpoints`, which skips incomplete ones).

Processes: one per device. Start it under ``torchrun`` or ``srun`` (Lightning reads their
environment), or plainly with ``trainer.devices=N``: Lightning then re-launches the command once
per extra rank. Without CUDA the CPU mode (:mod:`nemo_dcod.parallel.cpu_mode`) is switched on and
the ranks talk over gloo.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemo_dcod.config import ConfigError, to_yaml
from nemo_dcod.train.config import TrainConfig, init_checkpoint_config
from nemo_dcod.train.hooks import TrainHooks

__all__ = ["StoreLayout", "build_model", "gpt_config_of", "run_train", "store_layout"]


def _precision_fields(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.precision.dtype == "bf16":
        return {"bf16": True, "params_dtype": torch.bfloat16, "pipeline_dtype": torch.bfloat16}
    return {"bf16": False, "fp16": False, "params_dtype": torch.float32, "pipeline_dtype": torch.float32}


@dataclass(frozen=True)
class StoreLayout:
    """How store rows reach the model: the attention form and, for THD, the padded row length."""

    attention: str
    """One of :data:`~nemo_dcod.data.module.ATTENTION_FORMS`."""
    doc_multiple: int = 1
    row_length: int | None = None
    """Tokens per row as the model sees them (THD with context parallelism pads documents)."""


def store_layout(cfg: TrainConfig, te: bool, store_plan: str | None = None) -> StoreLayout:
    """The :class:`StoreLayout` of ``cfg``'s store for a model with (``te``) or without TE layers.

    With only a store plan (a dry run before the store exists), a THD row's length is the
    store's rounded up to the layout's row multiple: documents padded for context parallelism
    can add up to ``2·CP - 1`` positions each, known once the store exists.
    """
    from nemo_dcod.data.thd import store_row_length

    assert cfg.data.path is not None  # TrainConfig.problems() checked it
    form = cfg.attention_form(cfg.store_facts(store_plan), te)
    if form != "thd":
        return StoreLayout(form)
    doc, row = cfg.thd_multiples()
    if not (Path(cfg.data.path) / "manifest.json").is_file():
        return StoreLayout(form, doc, -(-cfg.data.seq_length // row) * row)
    return StoreLayout(form, doc, store_row_length(cfg.data.path, cfg.data.seq_length, doc, row))


def gpt_config_of(cfg: TrainConfig, seq_length: int | None = None, use_te: bool | None = None) -> Any:
    """The student's ``GPTConfig``: family/size or the ``model.init_from`` checkpoint's architecture,
    the parallel layout, precision and the plug-in's steps (nothing is built).

    Args:
        cfg: the training config.
        seq_length: tokens per row as the model sees them (a THD layout may pad rows); None:
            data.seq_length.
        use_te: Transformer Engine layers; None: as the config resolves on this machine (an
            error if they are asked for and TE cannot be imported).
    """
    from nemo_dcod.model.families import FAMILIES, build_gpt_config, have_transformer_engine

    p = cfg.parallel
    if use_te is None:
        use_te = cfg.uses_transformer_engine(torch.cuda.is_available())
        if use_te and not have_transformer_engine():
            raise ConfigError(
                [
                    f"model.spec={cfg.model.spec}: Transformer Engine cannot be imported on this machine "
                    "(install the GPU extra: pip install -e '.[gpu]'), or set model.spec=local."
                ],
                "model.spec",
            )
    init_config = init_checkpoint_config(cfg.model.init_from) if cfg.model.init_from else None
    family, size = cfg.student_family(), cfg.model.size
    if init_config is not None and size not in FAMILIES[family]:
        size = "tiny"  # the family's class only: the architecture is the checkpoint's
    return build_gpt_config(
        family,
        size,
        padded_vocab_size=cfg.vocab_rows(init_config),
        seq_length=seq_length or cfg.data.seq_length,
        parallel={
            "tensor_model_parallel_size": p.tensor_model_parallel_size,
            "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
            "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
            "context_parallel_size": p.context_parallel_size,
            "sequence_parallel": p.sequence_parallel,
            # Interleaved schedule: the steady state's batched forward+backward exchange sends to
            # the next and the previous stage in one batch; at PP=2 both are the same peer and the
            # tagless ops pair up crossed, so activations and gradients are silently swapped
            # (Megatron-LM issue #750). Split the directions, as Megatron-LM and NeMo's
            # MegatronCommOverlapCallback do for virtual pipelines.
            "overlap_p2p_comm": p.virtual_pipeline_model_parallel_size is not None,
            "batch_p2p_comm": p.virtual_pipeline_model_parallel_size is None,
        },
        precision=_precision_fields(cfg),
        overrides=cfg.model.overrides()
        if init_config is None or cfg.model.init_from is None
        else _architecture_of(init_config, cfg)
        | cfg.model.dropout_overrides()
        | _generation_config_of(cfg.model.init_from),
        use_te=use_te,
    )


def build_model(cfg: TrainConfig, seq_length: int | None = None) -> Any:
    """The :class:`~nemo_dcod.model.gpt.DistillGPTModel` of ``cfg`` with its optimizer (not yet built).

    Args:
        cfg: the training config.
        seq_length: see :func:`gpt_config_of`.
    """
    from megatron.core.optimizer import OptimizerConfig
    from nemo.lightning.pytorch.optim import CosineAnnealingScheduler, MegatronOptimizerModule

    from nemo_dcod.model.gpt import DistillGPTModel

    gpt_config = gpt_config_of(cfg, seq_length)
    o = cfg.optim
    optimizer = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=cfg.precision.dtype == "bf16",
        params_dtype=torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    scheduler = CosineAnnealingScheduler(
        max_steps=cfg.trainer.max_steps, warmup_steps=o.warmup_steps, constant_steps=0, min_lr=o.min_lr
    )
    # The optimizer must go to the constructor: GPTModel's default is the distributed optimizer,
    # and assigning `model.optim` later has no effect (FACTS.md).
    return DistillGPTModel(
        gpt_config,
        loss=dict(cfg.loss),
        vocab_size=cfg.data.vocab_size,
        total_steps=cfg.trainer.max_steps,
        stats_key=uuid.uuid4().hex,  # this launch's carried statistics (see DistillGPTModel)
        optim=MegatronOptimizerModule(config=optimizer, lr_scheduler=scheduler),
        context_length=_context_length_of(cfg.model.init_from) if cfg.model.init_from else None,
    )


# GPTConfig fields that decide the shapes or the function of a restored checkpoint's weights:
# with model.init_from they are the checkpoint's (vocab_size goes in as padded_vocab_size).
_ARCHITECTURE = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "normalization",
    "layernorm_epsilon",
    "gated_linear_unit",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "share_embeddings_and_output_weights",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    # Llama 3.1+ RoPE scaling (3.2's factor is 32, 3.1's 8): a checkpoint's own, never the class default.
    "scale_factor",
    "low_freq_factor",
    "high_freq_factor",
    "old_context_len",
)


def _architecture_of(init_config: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """The ``model.init_from`` checkpoint's architecture fields, as ``GPTConfig`` overrides (that the
    checkpoint is of model.family, and that the family does not contradict it, e.g. apply a RoPE
    scaling it does not have, is a config check: ``TrainConfig._init_from_problems``)."""
    return {name: init_config[name] for name in _ARCHITECTURE if name in init_config}


def _context_length_of(init_from: str) -> int | None:
    """The positions a ``model.init_from`` checkpoint's model was made for: a training checkpoint's
    recorded ``context_length``, else its config's ``seq_length`` (an import's is the HF model's
    ``max_position_embeddings``)."""
    import yaml

    recorded = yaml.safe_load((Path(init_from) / "context" / "model.yaml").read_text()) or {}
    length = recorded.get("context_length") or (recorded.get("config") or {}).get("seq_length")
    return int(length) if length else None


def _generation_config_of(init_from: str) -> dict[str, Any]:
    """``{"generation_config": ...}`` of a ``model.init_from`` checkpoint that records one (an import
    keeps the HF model's end-of-sequence ids there), so that the student's checkpoints, and its
    export, keep it; empty otherwise."""
    folder = Path(init_from) / "context" / "artifacts"
    if not (folder / "generation_config.json").is_file():
        return {}
    from transformers import GenerationConfig

    return {"generation_config": GenerationConfig.from_pretrained(str(folder))}


def _data_module(cfg: TrainConfig, layout: StoreLayout | None) -> Any:
    from nemo_dcod.data.module import StoreTraceDataModule
    from nemo_dcod.data.synthetic import SyntheticTraceDataModule

    t, d = cfg.trainer, cfg.data
    if d.source == "store":
        assert d.path is not None and layout is not None  # TrainConfig.problems() checked it
        return StoreTraceDataModule(
            path=d.path,
            seq_length=d.seq_length,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size,
            num_train_samples=d.num_train_samples or t.max_steps * t.global_batch_size,
            num_val_samples=d.num_val_samples if t.val_check_interval else 0,
            attention=layout.attention,
            doc_multiple=layout.doc_multiple,
            row_length=layout.row_length,
            shuffle_seed=cfg.seed if d.shuffle else None,
        )
    return SyntheticTraceDataModule(
        vocab_size=d.vocab_size,
        seq_length=d.seq_length,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        num_train_samples=d.num_train_samples or t.max_steps * t.global_batch_size,
        num_val_samples=d.num_val_samples,
        topk=d.topk,
        seed=d.seed,
    )


def _precision_plugin(cfg: TrainConfig) -> Any:
    from nemo import lightning as nl

    pr = cfg.precision
    if pr.dtype == "fp32":
        return None
    fp8: dict[str, Any] = {}
    if pr.fp8 is not None:
        fp8 = {
            "fp8": pr.fp8,
            "fp8_recipe": pr.fp8_recipe,
            "fp8_amax_history_len": pr.fp8_amax_history_len,
            "fp8_amax_compute_algo": pr.fp8_amax_compute_algo,
            "first_last_layers_bf16": pr.first_last_layers_bf16,
            "num_layers_at_start_in_bf16": pr.num_layers_at_start_in_bf16,
            "num_layers_at_end_in_bf16": pr.num_layers_at_end_in_bf16,
        }
    return nl.MegatronMixedPrecision(precision="bf16-mixed", params_dtype=torch.bfloat16, **fp8)


def _trainer(cfg: TrainConfig, run_dir: Path) -> Any:
    from megatron.core.distributed import DistributedDataParallelConfig
    from nemo import lightning as nl

    from nemo_dcod.train.callbacks import (
        CarryWeightStats,
        MetricsCallback,
        PreemptOnSigterm,
        PreemptOnSigusr1,
    )
    from nemo_dcod.train.rng_state import CarryRngStates

    p, t = cfg.parallel, cfg.trainer
    strategy = nl.MegatronStrategy(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        pipeline_dtype=_precision_fields(cfg)["pipeline_dtype"],
        ddp=DistributedDataParallelConfig(
            check_for_nan_in_grad=True,
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
            average_in_collective=False,  # the per-token loss divides by the global token count
        ),
        ckpt_async_save=t.async_save,
        ckpt_parallel_save=torch.cuda.is_available(),
        ckpt_parallel_load=torch.cuda.is_available(),
        replace_progress_bar=False,
    )
    tokens_per_step = t.global_batch_size * cfg.data.seq_length
    callbacks = [
        MetricsCallback(
            str(run_dir), tokens_per_step, t.max_steps, t.log_every_n_steps, config_yaml=to_yaml(cfg)
        ),
        CarryWeightStats(),
        CarryRngStates(),
        PreemptOnSigterm(),
        PreemptOnSigusr1(),
    ]
    plugin = _precision_plugin(cfg)
    trainer = nl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=t.devices,
        num_nodes=t.num_nodes,
        max_steps=t.max_steps,
        strategy=strategy,
        plugins=[plugin] if plugin is not None else None,
        callbacks=callbacks,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval or None,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches if t.val_check_interval else 0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        use_distributed_sampler=False,
        logger=False,  # NeMoLogger attaches TensorBoard
    )
    _no_lightning_requeue(trainer)
    return trainer


def _no_lightning_requeue(trainer: Any) -> None:
    """Under ``srun`` Lightning picks its Slurm environment (ranks from SLURM_PROCID, ...) with
    auto-requeue on: a SIGUSR1 handler that saves a Lightning ``hpc_ckpt`` from inside the handler,
    mid-step (NeMo's resume never reads it), and then requeues the job. Here NeMo's
    ``PreemptionCallback`` saves a NeMo checkpoint at the end of the step and ``launchers/slurm.sh``
    requeues the job, so Lightning's part is switched off (on the instance, not as a constructor
    plugin: NeMo records the trainer's arguments in every checkpoint's context)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = getattr(trainer.strategy, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment):
        environment.auto_requeue = False


def _logger(cfg: TrainConfig, run_dir: Path) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger
    from nemo import lightning as nl

    t = cfg.trainer
    checkpoint = nl.ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        every_n_train_steps=t.ckpt_every_n_steps,
        # "link": the -last checkpoint of a step that also saves its numbered one is a symlink to
        # it, not a second write of the same weights (1.7 GB for a 135M model with its optimizer).
        save_last="link",
        save_top_k=t.save_top_k,
        monitor="step",
        mode="max",
        save_on_train_epoch_end=True,
        save_optim_on_train_end=True,  # every checkpoint resumable, the final one too
        filename="{step}-{consumed_samples}",
    )
    return nl.NeMoLogger(
        name="",
        explicit_log_dir=str(run_dir),
        use_datetime_version=False,
        ckpt=checkpoint,
        tensorboard=TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""),
        update_logger_directory=False,
    )


def _seed_with(seed: int) -> None:
    """NeMo's strategy always seeds Megatron with 1234 (``init_parallel_ranks``'s default): use ours."""
    import functools

    from nemo.lightning import _strategy_lib

    original = getattr(_strategy_lib.init_parallel_ranks, "__wrapped__", _strategy_lib.init_parallel_ranks)
    seeded = functools.wraps(original)(functools.partial(original, seed=seed))
    _strategy_lib.init_parallel_ranks = seeded


def run_train(cfg: TrainConfig, hooks: TrainHooks | None = None) -> Path:
    """Train the student of ``cfg``; returns the run directory.

    Resumes from the newest complete checkpoint in ``<run_dir>/checkpoints`` when ``cfg.resume``
    (global rank 0's choice on every rank: :class:`~nemo_dcod.train.callbacks.ResumeAsRankZero`);
    otherwise starts from ``model.init_from`` (a NeMo 2 checkpoint) or a random initialisation.

    Args:
        cfg: the validated config.
        hooks: test points (fault injection, a rank's view of the checkpoints); None in production.
    """
    from nemo import lightning as nl
    from nemo.collections import llm

    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode
    from nemo_dcod.parallel.launch import launch_rank
    from nemo_dcod.parallel.threads import local_ranks, set_cpu_threads
    from nemo_dcod.train.callbacks import ResumeAsRankZero
    from nemo_dcod.train.checkpoints import newest_complete_checkpoint, shield_checkpoint_writer

    hooks = hooks or TrainHooks()
    enable_cpu_mode()
    set_cpu_threads(local_ranks(cfg.trainer.devices))
    _seed_with(cfg.seed)
    run_dir = Path(cfg.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_from = (
        newest_complete_checkpoint(run_dir / "checkpoints", hooks.checkpoint_problem) if cfg.resume else None
    )
    restore = (
        nl.RestoreConfig(path=cfg.model.init_from, load_optim_state=False) if cfg.model.init_from else None
    )
    resume = nl.AutoResume(
        resume_from_path=str(resume_from) if resume_from is not None else None,
        resume_if_exists=False,
        restore_config=restore if resume_from is None else None,
    )
    te = cfg.uses_transformer_engine(torch.cuda.is_available())
    layout = store_layout(cfg, te) if cfg.data.source == "store" else None
    model = build_model(cfg, seq_length=layout.row_length if layout else None)
    if launch_rank() == 0:
        from nemo_dcod.train.memory import train_estimate

        # Once, before the ranks start.
        print(
            train_estimate(cfg, model.config, layout.attention if layout else None, te).describe(), flush=True
        )
    trainer = _trainer(cfg, run_dir)
    # Not constructor arguments: NeMo records those in every checkpoint's context.
    trainer.callbacks.extend([ResumeAsRankZero(resume_from, restore), *hooks.callbacks])
    data = _data_module(cfg, layout)
    shield_checkpoint_writer()
    llm.train(model=model, data=data, trainer=trainer, log=_logger(cfg, run_dir), resume=resume)
    return run_dir
