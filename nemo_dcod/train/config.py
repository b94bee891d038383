"""The ``train`` stage's schema: one dataclass per section, every field with its docstring.

    cfg = load_config(TrainConfig, "conf/train_tiny.yaml", ["parallel.tensor_model_parallel_size=2"])

:meth:`TrainConfig.problems` checks everything that can be known before a model is built (sizes
that divide, pipeline stages vs layers, precision vs hardware, loss hyper-parameters) and returns
all problems at once; :func:`~nemo_dcod.config.load_config` raises them together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nemo_dcod.config import LOSS_SECTION, choice_problems
from nemo_dcod.losses.registry import LossRequirements, loss_problems, requirements_of
from nemo_dcod.model.families import FAMILIES, architecture, family_of_checkpoint, init_from_family_problems
from nemo_dcod.parallel.layout import LaunchSection, ParallelSection

if TYPE_CHECKING:
    from nemo_dcod.data.plan import StoreFacts

__all__ = [
    "DataSection",
    "ModelSection",
    "OptimSection",
    "ParallelSection",
    "PrecisionSection",
    "TrainConfig",
    "TrainerSection",
    "init_checkpoint_config",
    "padded_vocab_size",
]

DEFAULT_FAMILY = "llama3.1"
"""model.family without model.init_from when it is null."""

# The families and sizes the model plug-in knows (nemo_dcod.model.families imports no NeMo).
FAMILY_SIZES: dict[str, tuple[str, ...]] = {family: tuple(sizes) for family, sizes in FAMILIES.items()}


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int, divisible_by: int = 128) -> int:
    """Megatron's padding rule: a multiple of ``divisible_by * TP`` so that every shard is equal."""
    multiple = divisible_by * tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def init_checkpoint_config(path: str) -> dict[str, Any]:
    """The model config recorded in a NeMo 2 checkpoint's ``context/model.yaml``, as plain values.

    Read as YAML (no NeMo import): what the checks below and the model builder need from a
    ``model.init_from`` checkpoint (``vocab_size`` is its padded row count, ``num_layers``, ...).

    Raises:
        ValueError: no ``context/model.yaml`` under ``path``, or one without a ``config`` mapping.
    """
    from pathlib import Path

    import yaml

    where = Path(path) / "context" / "model.yaml"
    if not where.is_file():
        raise ValueError(
            f"model.init_from={path}: not a NeMo 2 checkpoint (no context/model.yaml); make one with "
            "`nemo-dcod import --hf DIR --out DIR` or point at a training checkpoint."
        )
    config = (yaml.safe_load(where.read_text()) or {}).get("config")
    if not isinstance(config, dict):
        raise ValueError(f"model.init_from={path}: {where} records no model config.")
    return config


@dataclass
class ModelSection:
    """The student."""

    family: str | None = field(default=None, metadata={"choices": (None, *FAMILY_SIZES)})
    """Architecture family, from NeMo's configs: llama (plain: no RoPE scaling) | llama3.1 | llama3.2 |
    llama3.3 | qwen2.5 | qwen3; null: model.init_from's (the family its config fits), llama3.1 without
    model.init_from. Named with model.init_from, it must not contradict the checkpoint (RoPE scaling,
    RoPE base, norm epsilon, tied embeddings: what the family fixes)."""
    size: str = "tiny"
    """A size of the family (e.g. 8b, 70b) or `tiny` (4 layers, width 64) for tests and the demo."""
    init_from: str | None = None
    """A NeMo 2 checkpoint to start from (e.g. made by `nemo-dcod import`); null: random init. Its
    architecture (layers, widths, heads, norms, RoPE, tied embeddings, padded vocabulary) is used;
    model.family must be its family (null: taken from it)."""
    num_layers: int | None = None
    """Override the family's layer count (tiny sizes and tests)."""
    hidden_size: int | None = None
    """Override the hidden size."""
    ffn_hidden_size: int | None = None
    """Override the MLP width."""
    spec: str = field(default="auto", metadata={"choices": ("auto", "local", "te")})
    """Layer implementation: te (Transformer Engine, GPU), local (megatron-core), auto (te when usable)."""
    dropout: float | None = None
    """Dropout probability of hidden states and attention probabilities (GPTConfig's hidden_dropout
    and attention_dropout), also with model.init_from; null: the family's (0 for Llama 3 and Qwen).
    Every rank's generators are in each checkpoint, so a run with dropout resumes exactly."""

    def shape(self) -> tuple[int, int, int]:
        """(num_layers, num_attention_heads, num_query_groups) after overrides, from NeMo's config
        class of model.family/size (:func:`~nemo_dcod.model.families.architecture`).

        Raises:
            ValueError: an unknown family or size.
        """
        arch = architecture(self.family or DEFAULT_FAMILY, self.size)
        return (self.num_layers or arch["num_layers"], arch["num_attention_heads"], arch["num_query_groups"])

    def overrides(self) -> dict[str, Any]:
        """The non-null overrides as ``GPTConfig`` fields."""
        names = ("num_layers", "hidden_size", "ffn_hidden_size")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None} | self.dropout_overrides()

    def dropout_overrides(self) -> dict[str, float]:
        """``hidden_dropout`` and ``attention_dropout`` from model.dropout (empty when null)."""
        return (
            {}
            if self.dropout is None
            else {"hidden_dropout": self.dropout, "attention_dropout": self.dropout}
        )


@dataclass
class PrecisionSection:
    """Numerics. bf16 and FP8 need a GPU; FP8 needs Transformer Engine."""

    dtype: str = field(default="fp32", metadata={"choices": ("fp32", "bf16")})
    """Parameter/activation precision (bf16 keeps fp32 master weights in the optimizer)."""
    fp8: str | None = field(default=None, metadata={"choices": (None, "e4m3", "hybrid")})
    """FP8 format through Transformer Engine; null: off."""
    fp8_recipe: str = field(
        default="delayed", metadata={"choices": ("delayed", "tensorwise", "mxfp8", "blockwise")}
    )
    """Transformer Engine FP8 scaling recipe."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling: amax history length."""
    fp8_amax_compute_algo: str = field(default="max", metadata={"choices": ("max", "most_recent")})
    """Delayed scaling: how the scale is computed from the history."""
    first_last_layers_bf16: bool = True
    """Keep the first/last transformer layers in bf16 under FP8."""
    num_layers_at_start_in_bf16: int = 1
    """With first_last_layers_bf16: leading layers kept in bf16."""
    num_layers_at_end_in_bf16: int = 1
    """With first_last_layers_bf16: trailing layers kept in bf16."""


@dataclass
class OptimSection:
    """Megatron's Adam with warm-up + cosine decay."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Final learning rate of the cosine decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    clip_grad: float = 1.0
    """Global gradient-norm clipping; 0: off."""
    adam_beta1: float = 0.9
    """Adam β1."""
    adam_beta2: float = 0.95
    """Adam β2."""
    adam_eps: float = 1e-8
    """Adam ε."""


@dataclass
class DataSection:
    """Where batches come from: the packed store of `nemo-dcod prepare`, or a synthetic teacher."""

    source: str = field(default="synthetic", metadata={"choices": ("synthetic", "store")})
    """store: the packed store at data.path; synthetic: a Markov teacher with exact log-probs and top-k."""
    path: str | None = None
    """store: the store directory (prepare's out_dir)."""
    vocab_size: int = 1000
    """The tokenizer's real vocabulary size (the model pads it; the loss excludes the padding).
    store: must equal the store's (its manifest's vocab_size)."""
    seq_length: int = 64
    """Tokens per sample. store: must equal the store's row length."""
    num_train_samples: int | None = None
    """Training samples; null: max_steps x global_batch_size."""
    num_val_samples: int = 16
    """Validation samples (store: rows held out, only when trainer.val_check_interval > 0)."""
    shuffle: bool = True
    """store: serve the training rows in a new permutation each epoch, drawn from the run's `seed`
    and the epoch (the same global batches for every layout, resumable mid-epoch), and hold out a
    seeded random subset for validation; false: store order every epoch (with prepare's best_fit
    packing, longest documents first: a length curriculum) and the last rows held out. The synthetic
    source draws i.i.d. samples either way."""
    topk: int = 4
    """Teacher top-k stored per token (needed by the kl/todi losses and DisCorD's kl base)."""
    seed: int = 0
    """Seed of the synthetic teacher and its samples."""


@dataclass
class TrainerSection(LaunchSection):
    """The job's processes (the keys every Megatron stage shares), the training loop, batch sizes,
    validation and checkpoints."""

    max_steps: int = 20
    """Optimizer steps."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks."""
    micro_batch_size: int = 2
    """Samples per forward pass on one rank."""
    val_check_interval: int = 0
    """Validate every this many steps; 0: never."""
    limit_val_batches: int = 2
    """Validation batches per validation."""
    log_every_n_steps: int = 1
    """Progress line and TensorBoard interval (metrics.jsonl gets every step)."""
    ckpt_every_n_steps: int = 10
    """Save a NeMo 2 checkpoint every this many steps (and at the end)."""
    save_top_k: int = 2
    """Checkpoints kept (newest first); -1: all."""
    async_save: bool = False
    """Write checkpoints in a background process (GPU runs)."""


@dataclass
class TrainConfig:
    """``nemo-dcod train``: the student with DisCorD (or a baseline) through the NeMo plug-in."""

    run_dir: str = "runs/train"
    """Everything of the run: config.yaml, metrics.jsonl, TensorBoard events, checkpoints."""
    seed: int = 1234
    """Seed of initialisation and dropout (Megatron adds 100 x pipeline rank)."""
    resume: bool = True
    """Continue from the newest complete checkpoint in run_dir when there is one."""
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "discord"}, metadata=LOSS_SECTION)
    """The loss and its parameters: `{name: discord, tau: 1.0, ...}` (the losses and theirs below)."""

    @property
    def world_size(self) -> int:
        """Processes in the job."""
        return self.trainer.world_size

    @property
    def model_parallel_size(self) -> int:
        """TP x PP x CP: the ranks that hold one replica."""
        return self.parallel.model_parallel_size

    @property
    def use_distributed_optimizer(self) -> bool:
        """parallel.use_distributed_optimizer, with null resolved: on with a GPU, off on CPU."""
        choice = self.parallel.use_distributed_optimizer
        if choice is None:
            import torch

            return torch.cuda.is_available()
        return choice

    @property
    def data_parallel_size(self) -> int:
        """Replicas (world size / model-parallel size)."""
        return self.parallel.data_parallel_size(self.world_size)

    def problems(
        self, has_gpu: bool | None = None, check_paths: bool = True, store_plan: str | None = None
    ) -> list[str]:
        """Every problem of this config, each naming the fields that clash and how to fix them.

        Args:
            has_gpu: validate as for a machine with (True) or without (False) a GPU; None: this one.
            check_paths: also check the files the config names (the store's manifest, the
                ``model.init_from`` checkpoint).
            store_plan: a store plan (:mod:`nemo_dcod.data.plan`) to check against when data.path
                holds no store yet (dry runs at submission time).
        """
        if has_gpu is None:
            import torch

            has_gpu = torch.cuda.is_available()
        out: list[str] = []
        for prefix, section in (
            ("model", self.model),
            ("precision", self.precision),
            ("data", self.data),
        ):
            out.extend(choice_problems(section, prefix))
        out.extend(loss_problems(self.loss, "loss"))
        out.extend(self._size_problems(check_paths, has_gpu, store_plan))
        out.extend(self._layout_problems(has_gpu))
        out.extend(self._hardware_problems(has_gpu))
        return out

    def _size_problems(self, check_paths: bool, has_gpu: bool, store_plan: str | None) -> list[str]:
        out = []
        family = self.model.family or DEFAULT_FAMILY
        sizes = FAMILY_SIZES.get(family, ())
        if sizes and self.model.size not in sizes and (self.model.family or not self.model.init_from):
            out.append(f"model.size={self.model.size!r}: {family} has sizes {', '.join(sizes)}.")
        out.extend(self.trainer.launch_problems("trainer"))
        positive = {
            "trainer.max_steps": self.trainer.max_steps,
            "trainer.global_batch_size": self.trainer.global_batch_size,
            "trainer.micro_batch_size": self.trainer.micro_batch_size,
            "trainer.log_every_n_steps": self.trainer.log_every_n_steps,
            "trainer.ckpt_every_n_steps": self.trainer.ckpt_every_n_steps,
            "data.vocab_size": self.data.vocab_size,
            "data.seq_length": self.data.seq_length,
        }
        out.extend(f"{k}={v}: must be >= 1." for k, v in positive.items() if v < 1)
        if self.seed < 1:  # NeMo's seeding raises on it once the ranks have started
            out.append(f"seed={self.seed}: must be >= 1 (NeMo requires a positive seed).")
        if self.optim.lr <= 0 or not 0 <= self.optim.min_lr <= self.optim.lr:
            out.append(
                f"optim.lr={self.optim.lr}, optim.min_lr={self.optim.min_lr}: need 0 <= min_lr <= lr, lr > 0."
            )
        if self.optim.warmup_steps < 0 or self.optim.warmup_steps >= max(self.trainer.max_steps, 1):
            out.append(
                f"optim.warmup_steps={self.optim.warmup_steps}: must be in [0, trainer.max_steps="
                f"{self.trainer.max_steps})."
            )
        if self.model.dropout is not None and not 0 <= self.model.dropout < 1:
            out.append(f"model.dropout={self.model.dropout}: must be in [0, 1) (or null).")
        if self.optim.clip_grad < 0 or self.optim.weight_decay < 0:
            out.append("optim.clip_grad and optim.weight_decay: must be >= 0.")
        if self.data.topk < 0 or self.data.topk >= self.data.vocab_size:
            out.append(f"data.topk={self.data.topk}: must be in [0, data.vocab_size).")
        if self.model.init_from is not None and check_paths:
            out.extend(self._init_from_problems())
        if self.data.source == "store":
            out.extend(self._store_problems(has_gpu, store_plan) if check_paths else [])
        elif self.loss_requirements().teacher_topk and self.data.topk == 0:
            out.append(f"loss.name={self.loss.get('name')!r} reads the teacher top-k: set data.topk > 0.")
        return out

    def vocab_rows(self, init_config: dict[str, Any] | None = None) -> int:
        """Rows of the embedding / output layer: a ``model.init_from`` checkpoint's own (it may be
        padded by another rule, e.g. Qwen's 151936), else data.vocab_size padded to 128 x TP."""
        if init_config is not None:
            return int(init_config["vocab_size"])
        return padded_vocab_size(self.data.vocab_size, self.parallel.tensor_model_parallel_size)

    def _init_from_problems(self) -> list[str]:
        assert self.model.init_from is not None
        try:
            config = init_checkpoint_config(self.model.init_from)
        except ValueError as exc:
            return [str(exc)]
        out = []
        rows, tp = int(config.get("vocab_size") or 0), self.parallel.tensor_model_parallel_size
        where = f"model.init_from={self.model.init_from}"
        if self.data.vocab_size > rows:
            out.append(
                f"data.vocab_size={self.data.vocab_size}: larger than the {rows} embedding rows of "
                f"{where}: the data's tokenizer is not the checkpoint's."
            )
        if tp >= 1 and rows % tp:
            out.append(
                f"parallel.tensor_model_parallel_size={tp} does not divide the {rows} vocabulary rows of "
                f"{where}: pick a TP that divides it."
            )
        for name in ("num_layers", "hidden_size", "ffn_hidden_size"):
            mine = getattr(self.model, name)
            if mine is not None and config.get(name) is not None and mine != config[name]:
                out.append(
                    f"model.{name}={mine}: {where} has {config[name]}; the checkpoint's architecture is "
                    f"used, drop model.{name}."
                )
        out.extend(init_from_family_problems(self.model.family, self.model.size, config, where))
        if self.data.source == "store" and self.data.path:
            out.extend(self._tokenizer_problems(where))
        return out

    def _tokenizer_problems(self, where: str) -> list[str]:
        """The store's token ids must mean the checkpoint's tokens (same size is not enough)."""
        import json
        from pathlib import Path

        from nemo_dcod.data.vocab import checkpoint_tokenizer_dir, tokenizer_vocab, vocabulary_diff

        assert self.model.init_from is not None and self.data.path is not None
        checkpoint_tokens = checkpoint_tokenizer_dir(self.model.init_from)
        manifest = Path(self.data.path) / "manifest.json"
        if checkpoint_tokens is None or not manifest.is_file():
            return []  # a checkpoint trained from scratch carries none; no store yet: its own checks
        try:
            store_tokens = json.loads(manifest.read_text())["tokenizer"]["path"]
            diff = vocabulary_diff(tokenizer_vocab(store_tokens), tokenizer_vocab(checkpoint_tokens))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            return [f"data.path={self.data.path}: cannot compare its tokenizer with {where}'s: {exc}"]
        if not diff:
            return []
        return [
            f"data.path={self.data.path}: the store's tokenizer ({store_tokens}) is not the one of {where} "
            f"({checkpoint_tokens}): its token ids would mean other tokens.\n    "
            + "\n    ".join(diff)
            + "\n  Prepare the store with the checkpoint's tokenizer."
        ]

    def student_family(self) -> str:
        """The family the student is built as: model.family; when null, the ``model.init_from``
        checkpoint's (:func:`~nemo_dcod.model.families.family_of_checkpoint`), else llama3.1.

        Raises:
            ValueError: model.family is null and the checkpoint fits no family (``validate`` says so).
        """
        if self.model.family is not None:
            return self.model.family
        if self.model.init_from is None:
            return DEFAULT_FAMILY
        config = init_checkpoint_config(self.model.init_from)
        family = family_of_checkpoint(config)
        if family is None:
            raise ValueError(f"model.init_from={self.model.init_from}: its model fits no model.family.")
        return family

    def model_shape(self) -> tuple[int, int, int]:
        """(num_layers, num_attention_heads, num_query_groups) of the student: the ``model.init_from``
        checkpoint's when there is one (its architecture is used), else model.family/size's."""
        if self.model.init_from is not None:
            try:
                config = init_checkpoint_config(self.model.init_from)
                return (
                    int(config["num_layers"]),
                    int(config["num_attention_heads"]),
                    int(config.get("num_query_groups") or config["num_attention_heads"]),
                )
            except (ValueError, KeyError, TypeError):
                pass  # reported by _init_from_problems
        return self.model.shape()

    def loss_requirements(self) -> LossRequirements:
        """What the configured loss reads (nothing, when the loss section itself is invalid: its
        problems are reported on their own)."""
        if loss_problems(self.loss, "loss"):
            return LossRequirements()
        return requirements_of(self.loss)

    def uses_transformer_engine(self, has_gpu: bool) -> bool:
        """Whether the student is built with Transformer Engine layers: model.spec=te, or auto on a
        GPU machine where TE is installed (found without importing it: TE raises without CUDA)."""
        if self.model.spec != "auto":
            return self.model.spec == "te"
        if not has_gpu:
            return False
        import importlib.util

        import torch

        if torch.cuda.is_available():  # this is the GPU machine: TE must also import
            from nemo_dcod.model.families import have_transformer_engine

            return have_transformer_engine()
        return importlib.util.find_spec("transformer_engine") is not None

    def attention_form(self, facts: StoreFacts, te: bool) -> str:
        """How store batches keep documents apart (:data:`~nemo_dcod.data.module.ATTENTION_FORMS`):
        THD boundaries for Transformer Engine, a dense block-diagonal mask for the local spec, or
        nothing beyond causality when every row holds one document."""
        if not facts.packed:
            return "causal"
        return "thd" if te else "dense_mask"

    def thd_multiples(self) -> tuple[int, int]:
        """(document, row) multiples of the THD layout for this parallel layout and precision."""
        from nemo_dcod.data.thd import row_multiple

        p = self.parallel
        return row_multiple(
            p.context_parallel_size,
            p.tensor_model_parallel_size,
            p.sequence_parallel,
            self.precision.fp8 is not None,
        )

    def store_facts(self, plan: str | None = None) -> StoreFacts:
        """The facts of data.path's store (or of the plan, when no store is there yet).

        Raises:
            ValueError: neither exists, or one is unreadable (the message says what to run).
        """
        from nemo_dcod.data.plan import store_facts

        if not self.data.path:
            raise ValueError("data.source=store needs data.path (the out_dir of `nemo-dcod prepare`).")
        return store_facts(self.data.path, plan)

    def _store_problems(self, has_gpu: bool, plan: str | None) -> list[str]:
        d = self.data
        try:
            facts = self.store_facts(plan)
        except ValueError as exc:
            return [f"data.path={d.path}: {exc}"]
        out = []
        where = f"the store at {d.path}" + (
            f" (planned: {facts.source})" if "manifest.json" not in facts.source else ""
        )
        if facts.seq_length != d.seq_length:
            out.append(f"data.seq_length={d.seq_length}: {where} has rows of {facts.seq_length} tokens.")
        if facts.vocab_size != d.vocab_size:
            out.append(f"data.vocab_size={d.vocab_size}: the tokenizer of {where} has {facts.vocab_size}.")
        needs = self.loss_requirements()
        name = self.loss.get("name")
        if needs.teacher_logprobs and facts.teacher_logprobs is None:
            out.append(
                f"loss.name={name!r} reads teacher log-probs, which {where} lacks: "
                "run `nemo-dcod score`, or train with loss.name=sft."
            )
        if needs.teacher_topk and facts.topk == 0:
            out.append(
                f"loss.name={name!r} reads the teacher top-k, which {where} lacks: run "
                "`nemo-dcod score` with topk > 0."
            )
        te = self.uses_transformer_engine(has_gpu)
        if self.attention_form(facts, te) == "thd" and self.trainer.micro_batch_size != 1:
            out.append(
                f"trainer.micro_batch_size={self.trainer.micro_batch_size}: Transformer Engine on packed "
                "rows (THD) takes one row per micro-batch: set it to 1 and pack more documents per row (a "
                "longer seq_length in prepare), or use a store with one document per row (prepare "
                "packing=none)."
            )
        return out

    def _layout_problems(self, has_gpu: bool) -> list[str]:
        p, t = self.parallel, self.trainer
        try:
            shape: tuple[int, int, int] | None = self.model_shape()
        except ValueError:  # an unknown family or size: reported by _size_problems
            shape = None
        out = p.problems(self.world_size, shape)
        dp = self.data_parallel_size
        if t.micro_batch_size >= 1 and t.global_batch_size % (t.micro_batch_size * dp):
            out.append(
                f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
                "trainer.micro_batch_size "
                f"x data-parallel size = {t.micro_batch_size} x {dp}."
            )
        tp = p.tensor_model_parallel_size
        if p.sequence_parallel and tp >= 1 and self.data.seq_length % tp:
            out.append(
                f"data.seq_length={self.data.seq_length} must be divisible by "
                f"parallel.tensor_model_parallel_size={tp} with sequence parallelism (each rank holds "
                "seq_length / TP positions)."
            )
        cp = p.context_parallel_size
        if cp > 1 and not self.uses_transformer_engine(has_gpu):
            out.append(
                f"parallel.context_parallel_size={cp} needs Transformer Engine layers (model.spec=te, on a "
                f"GPU machine with TE; here model.spec={self.model.spec} builds megatron-core's local "
                "layers): "
                "the local attention cannot split a sequence over ranks (its DotProductAttention "
                "requires context_parallel_size == 1). Set parallel.context_parallel_size=1."
            )
        if cp > 1:
            if self.data.seq_length % (2 * cp):
                out.append(
                    f"data.seq_length={self.data.seq_length} must be divisible by 2 x context_parallel_size."
                )
            if self.loss_requirements().whole_documents:
                out.append(
                    f"parallel.context_parallel_size={cp} splits each sequence over ranks: loss "
                    f"{self.loss.get('name')!r} (variant {self.loss.get('variant', '-')}) needs whole "
                    "documents on one rank; use a per-token loss (e.g. discord with variant=token) or CP=1."
                )
        return out

    def _hardware_problems(self, has_gpu: bool) -> list[str]:
        out = []
        pr = self.precision
        if not has_gpu:
            if pr.dtype != "fp32":
                out.append(f"precision.dtype={pr.dtype}: needs a GPU (this machine has none); use fp32.")
            if pr.fp8 is not None:
                out.append(
                    f"precision.fp8={pr.fp8}: FP8 needs a GPU and Transformer Engine; set precision.fp8=null."
                )
            if self.model.spec == "te":
                out.append("model.spec=te: Transformer Engine needs a GPU; use model.spec=local or auto.")
            if self.parallel.use_distributed_optimizer:
                out.append(
                    "parallel.use_distributed_optimizer=true: not supported on CPU; set it to null or false."
                )
            if self.trainer.async_save:
                out.append("trainer.async_save=true: needs a GPU; set it to false.")
        elif pr.fp8 is not None:
            if pr.dtype != "bf16":
                out.append(f"precision.fp8={pr.fp8} needs precision.dtype=bf16.")
            if self.model.spec == "local":
                out.append("precision.fp8 needs Transformer Engine layers: set model.spec=te or auto.")
        return out
