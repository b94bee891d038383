"""The ``generate`` stage's schema: problems in, a teacher, prompts, sampling, sharded traces out.

    cfg = load_config(GenerateConfig, "conf/generate_tiny.yaml", ["teacher=runs/demo/hf/sft"])

Import-free on purpose (no torch, transformers or vLLM): validating a config must be instant.
:meth:`GenerateConfig.problems` checks what can be known without reading a file; the problems
file, the teacher and the prompt lengths are checked when the stage (or its dry run) starts,
before any model is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from nemo_dcod.config import choice_problems
from nemo_dcod.eval.config import DEFAULT_PROMPT_TEMPLATE, GradingSection

__all__ = [
    "GenerateConfig",
    "GenerateError",
    "ProblemFieldsSection",
    "TraceGradingSection",
    "TraceSamplingSection",
]

INPUT_FORMATS = ("auto", "jsonl", "json", "parquet", "hf_disk")


class GenerateError(ValueError):
    """A generate input that cannot be used (the message names the file, record or field), or a
    run that produced nothing usable."""


@dataclass
class ProblemFieldsSection:
    """Where each part of a problem lives in an input record (dotted paths: ``meta.question``;
    an integer part indexes a list)."""

    problem: str = "problem"
    """The problem text: what the prompt template's {problem} becomes (GSM8K: question)."""
    reference: str | None = None
    """The reference answer, for grading (GSM8K: answer, MATH: solution); a value holding `####`
    or `\\boxed{}` is reduced to that final answer. null: no grading (`correct` is null)."""
    id: str | None = None
    """A unique id per problem; null: the record's position in the inputs (0, 1, ...)."""

    def problems(self, prefix: str = "fields") -> list[str]:
        out = []
        if not self.problem:
            out.append(f"{prefix}.problem: must name the field holding the problem text.")
        for name in ("reference", "id"):
            if getattr(self, name) == "":
                out.append(f"{prefix}.{name}: empty; name a field, or null for none.")
        return out


@dataclass
class TraceSamplingSection:
    """How the teacher's traces are drawn. The recorded log-probs are always the untempered ones."""

    samples_per_problem: int = 1
    """Traces per problem (each its own sample)."""
    temperature: float = 1.0
    """0: greedy (one sample per problem); > 0: sampling at this temperature."""
    top_p: float = 1.0
    """Nucleus sampling: draw from the smallest set of tokens holding this much probability."""
    max_new_tokens: int = 1024
    """Tokens a trace may run to; longer ones are cut (finish_reason=length) and not usable."""
    seed: int = 0
    """Seeds sampling; each shard draws from its own seed derived from this one, so a shard's
    traces do not depend on which worker made them or on what ran before."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a trace (kept at its end); empty: the end-of-sequence tokens only."""

    def problems(self, prefix: str = "sampling") -> list[str]:
        out = []
        if self.samples_per_problem < 1:
            out.append(f"{prefix}.samples_per_problem={self.samples_per_problem}: must be >= 1.")
        if self.temperature < 0:
            out.append(f"{prefix}.temperature={self.temperature}: must be >= 0 (0 is greedy).")
        if self.temperature == 0 and self.samples_per_problem > 1:
            out.append(
                f"{prefix}.samples_per_problem={self.samples_per_problem} with {prefix}.temperature=0: "
                f"greedy samples are all the same; set {prefix}.temperature > 0 or "
                f"{prefix}.samples_per_problem=1."
            )
        if not 0 < self.top_p <= 1:
            out.append(f"{prefix}.top_p={self.top_p}: must be in (0, 1].")
        if self.max_new_tokens < 1:
            out.append(f"{prefix}.max_new_tokens={self.max_new_tokens}: must be >= 1.")
        if any(not s for s in self.stop):
            out.append(f"{prefix}.stop: an empty string would stop every trace at once; remove it.")
        return out


@dataclass
class TraceGradingSection(GradingSection):
    """How a trace's `correct` is decided: eval's answer extraction and equivalence grading."""

    fallback: bool = False
    """When no final answer is found: the text after "answer is", else the last number. Off by
    default here: a guess must not mark a trace correct."""


@dataclass
class GenerateConfig:
    """``nemo-dcod generate``: problems x a teacher -> sampled traces with the teacher's per-token
    log-probs, graded, in resumable JSONL shards that ``nemo-dcod prepare`` reads."""

    inputs: list[str] = field(default_factory=list)
    """Problem files (.jsonl, .json, .parquet), glob patterns, or Hugging Face datasets saved to disk."""
    format: str = field(default="auto", metadata={"choices": INPUT_FORMATS})
    """Input format; auto: by suffix (.jsonl, .json, .parquet), a directory is a saved HF dataset."""
    hf_split: str | None = None
    """hf_disk: the split of a saved DatasetDict (e.g. train); null: the dataset has one split."""
    limit: int | None = None
    """Use the first `limit` problems only; null: all."""
    teacher: str = ""
    """The teacher: a Hugging Face checkpoint directory (config.json + safetensors + tokenizer)."""
    tokenizer: str | None = None
    """The tokenizer directory; null: the teacher's own."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """The user message; {problem} is replaced by the problem text (no other braces are special)."""
    use_chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template (instruct teachers); false: raw text."""
    chat_template: str | None = None
    """A Jinja chat template (or a file holding one) replacing the tokenizer's; null: the tokenizer's."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template, e.g. {enable_thinking: true} for Qwen3."""
    system_prompt: str | None = None
    """A system message before the prompt (written into every trace as `system`); null: none."""
    keep: str = field(default="all", metadata={"choices": ("all", "correct")})
    """Which samples are written: all, or only those graded correct (problems without a reference
    keep all their samples)."""
    backend: str = field(default="auto", metadata={"choices": ("auto", "transformers", "vllm")})
    """Generation engine: vllm (GPUs; pip install vllm), transformers (CPU or GPU), or auto (vllm
    when installed and a GPU is there, else transformers)."""
    batch_size: int = 16
    """transformers: sequences generated together (left-padded)."""
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16", "float16")})
    """Compute dtype; auto: float32 on CPU, the checkpoint's on GPU. Log-probs are computed in fp32."""
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    """transformers: where the model runs; auto: the GPU of this process's local rank if any."""
    tensor_parallel_size: int = 1
    """vllm: GPUs one teacher is split over (a node's, e.g. 8 for a 70B teacher)."""
    gpu_memory_utilization: float = 0.9
    """vllm: fraction of GPU memory it may take."""
    max_model_len: int | None = None
    """vllm: context length to allocate for; null: the model's. Prompts + max_new_tokens must fit."""
    trust_remote_code: bool = False
    """Allow checkpoints that ship their own modelling code."""
    problems_per_shard: int = 256
    """Problems per output shard: the unit of work, of resume and of a worker."""
    worker_index: int | None = None
    """This worker's index; null: from the launcher (Slurm array task x srun / torchrun rank), else 0."""
    num_workers: int | None = None
    """Independent workers sharing the shards (shard i goes to worker i % num_workers); null: from
    the launcher, else 1."""
    out_dir: str = "runs/generate"
    """Where traces/, meta/, config.yaml, report.json and prepare.yaml go. A rerun with the same
    inputs and config skips finished shards and redoes the rest."""
    overwrite: bool = False
    """Regenerate shards finished with other inputs or another config (otherwise an error)."""
    progress: bool = True
    """Print a progress line (samples, tokens/s, ETA) after every batch."""
    fields: ProblemFieldsSection = field(default_factory=ProblemFieldsSection)
    sampling: TraceSamplingSection = field(default_factory=TraceSamplingSection)
    grading: TraceGradingSection = field(default_factory=TraceGradingSection)

    def problems(self, has_gpu: bool | None = None) -> list[str]:
        """Every problem of this config, each naming the field and how to fix it.

        Args:
            has_gpu: validate as for a machine with (True) or without (False) a GPU; None: do not
                check what depends on it (the stage checks it when it runs).
        """
        out = choice_problems(self)
        out.extend(self.fields.problems())
        out.extend(self.sampling.problems())
        out.extend(self.grading.problems())
        if not self.inputs:
            out.append("inputs: list at least one problems file, glob pattern or saved dataset.")
        if not self.teacher:
            out.append("teacher: set the teacher's Hugging Face checkpoint directory.")
        if self.limit is not None and self.limit < 1:
            out.append(f"limit={self.limit}: must be >= 1, or null for every problem.")
        if "{problem}" not in self.prompt_template:
            out.append("prompt_template: must contain {problem} (where the problem text goes).")
        for name in ("batch_size", "tensor_parallel_size", "problems_per_shard"):
            if getattr(self, name) < 1:
                out.append(f"{name}={getattr(self, name)}: must be >= 1.")
        if not 0 < self.gpu_memory_utilization <= 1:
            out.append(f"gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1].")
        if self.max_model_len is not None and self.max_model_len < 2:
            out.append(f"max_model_len={self.max_model_len}: must be >= 2, or null for the model's.")
        if self.keep == "correct" and self.fields.reference is None:
            out.append("keep=correct needs fields.reference (the field holding the reference answer).")
        if (self.worker_index is None) != (self.num_workers is None):
            out.append(
                "worker_index and num_workers: set both (this worker of how many), or neither (from the "
                "launcher's environment)."
            )
        elif self.num_workers is not None and self.worker_index is not None:
            if self.num_workers < 1:
                out.append(f"num_workers={self.num_workers}: must be >= 1.")
            elif not 0 <= self.worker_index < self.num_workers:
                out.append(
                    f"worker_index={self.worker_index}: must be in [0, num_workers={self.num_workers})."
                )
        if self.backend == "vllm" and self.device == "cpu":
            out.append("backend=vllm with device=cpu: vLLM runs on GPUs here; set backend=transformers.")
        if has_gpu is False and self.backend == "vllm":
            out.append("backend=vllm: this machine has no GPU; set backend=transformers (or auto).")
        if self.backend != "vllm" and self.tensor_parallel_size > 1:
            out.append(
                f"tensor_parallel_size={self.tensor_parallel_size} is for backend=vllm; transformers runs "
                "one model per process (start one worker per GPU)."
            )
        if self.format == "hf_disk" and any(any(c in p for c in "*?[") for p in self.inputs):
            out.append("inputs: glob patterns are for files; list saved datasets (hf_disk) by directory.")
        if not self.out_dir:
            out.append("out_dir: must not be empty.")
        return out

    def content_settings(self) -> dict[str, Any]:
        """The settings that decide what a shard holds (not where, by which worker, or how verbosely):
        part of every shard's key, so a rerun with other settings is caught."""
        settings = asdict(self)
        # The problems themselves are hashed into the key (inputs and limit only select them).
        placement = ("inputs", "limit", "out_dir", "overwrite", "progress", "worker_index", "num_workers")
        for name in (*placement, "gpu_memory_utilization"):
            settings.pop(name)
        return settings
