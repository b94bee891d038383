"""The ``eval`` stage's schema: models, benchmarks, prompts, sampling and grading.

    cfg = load_config(EvalConfig, "conf/eval_tiny.yaml", ["sampling.temperature=0.6", "sampling.top_p=0.95"])

Imports nothing of eval's heavy dependencies (transformers, math-verify, matplotlib, vLLM):
validating a config must not load them.
:meth:`EvalConfig.problems` checks everything that can be known without reading a file; paths
are checked when the stage runs, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from nemo_dcod.config import choice_problems

__all__ = [
    "BENCHMARK_FORMATS",
    "DEFAULT_PROMPT_TEMPLATE",
    "BenchmarkEntry",
    "EvalConfig",
    "EvalError",
    "GradingSection",
    "ModelEntry",
    "SamplingSection",
]

BENCHMARK_FORMATS = ("gsm8k", "math", "math500", "amc", "aime", "olympiadbench")
"""The public formats :mod:`nemo_dcod.eval.benchmarks` reads."""

DEFAULT_PROMPT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."
"""The prompt of DeepSeek-R1's and Qwen2.5-Math's evaluations."""


class EvalError(ValueError):
    """An eval input that cannot be used: a missing model or file, a malformed benchmark record."""


@dataclass
class ModelEntry:
    """A checkpoint to evaluate (an exported Hugging Face directory)."""

    path: str = ""
    """The Hugging Face checkpoint directory (config.json + safetensors), from `nemo-dcod export`."""
    label: str | None = None
    """Its name in the results, table and plot; null: the directory's name."""
    tokenizer: str | None = None
    """The tokenizer directory; null: the checkpoint's own."""

    def resolved_label(self) -> str:
        """``label``, or the last part of ``path``."""
        return self.label or PurePath(self.path.rstrip("/")).name or self.path


@dataclass
class BenchmarkEntry:
    """A benchmark: a local file in its public format (or a hub name when a network exists)."""

    name: str = ""
    """Its name in the results (e.g. aime24); unique within a run."""
    format: str = field(default="math500", metadata={"choices": BENCHMARK_FORMATS})
    """gsm8k | math | math500 | amc | aime | olympiadbench: which fields hold problem and answer."""
    path: str = ""
    """A .jsonl / .json / .parquet file, a glob of them, a saved HF dataset directory, or a hub name."""
    split: str | None = "test"
    """The split of a saved DatasetDict or a hub dataset; ignored for files."""
    subset: str | None = None
    """A hub dataset's configuration (e.g. main for openai/gsm8k); ignored for files."""
    limit: int | None = None
    """Evaluate the first `limit` problems only; null: all."""
    prompt_template: str | None = None
    """This benchmark's own prompt template; null: the run's `prompt_template`."""

    def problems(self, prefix: str) -> list[str]:
        out = choice_problems(self, prefix)
        if not self.name:
            out.append(f"{prefix}.name: must not be empty.")
        if not self.path:
            out.append(f"{prefix}.path: set the benchmark file (.jsonl, .json, .parquet).")
        if self.limit is not None and self.limit < 1:
            out.append(f"{prefix}.limit={self.limit}: must be >= 1, or null for every problem.")
        if self.prompt_template is not None and "{problem}" not in self.prompt_template:
            out.append(f"{prefix}.prompt_template: must contain {{problem}} (where the problem text goes).")
        return out


@dataclass
class SamplingSection:
    """Greedy pass@1 (temperature 0), or avg@k over k samples (temperature > 0)."""

    temperature: float = 0.0
    """0: greedy decoding (pass@1); > 0: sampling, scored as avg@k."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability (sampling only)."""
    num_samples: int = 1
    """k: completions per problem (1 when greedy)."""
    max_new_tokens: int = 2048
    """Tokens a completion may run to; longer ones are cut (finish_reason=length) and usually wrong."""
    seed: int = 0
    """Seeds sampling (reset before each benchmark)."""

    def problems(self, prefix: str = "sampling") -> list[str]:
        out = []
        if self.temperature < 0:
            out.append(f"{prefix}.temperature={self.temperature}: must be >= 0 (0 is greedy).")
        if not 0 < self.top_p <= 1:
            out.append(f"{prefix}.top_p={self.top_p}: must be in (0, 1].")
        if self.num_samples < 1:
            out.append(f"{prefix}.num_samples={self.num_samples}: must be >= 1.")
        if self.temperature == 0 and self.num_samples > 1:
            out.append(
                f"{prefix}.num_samples={self.num_samples} with {prefix}.temperature=0: greedy samples are "
                f"all the same; set {prefix}.temperature > 0 (avg@k) or {prefix}.num_samples=1 (pass@1)."
            )
        if self.max_new_tokens < 1:
            out.append(f"{prefix}.max_new_tokens={self.max_new_tokens}: must be >= 1.")
        return out


@dataclass
class GradingSection:
    """Answer extraction and equivalence grading."""

    extraction: str = field(default="auto", metadata={"choices": ("auto", "boxed", "gsm8k")})
    """Where the final answer is: the last \\boxed{} (boxed), after #### (gsm8k), boxed else #### (auto)."""
    fallback: bool = True
    """When none is found: the text after "answer is", else the last number."""
    grader: str = field(default="auto", metadata={"choices": ("auto", "math_verify", "string")})
    """math_verify (pip install -e '.[eval]'), string (normalised strings only), or auto (math_verify
    when installed, else string)."""
    timeout: int = 5
    """Seconds per math-verify parse or comparison; past it the answer is wrong (graded_by=timeout)."""
    timeout_backend: str = field(default="auto", metadata={"choices": ("auto", "signal", "process")})
    """How the timeout is enforced: signal (main thread only), process (a grading child), auto."""

    def problems(self, prefix: str = "grading") -> list[str]:
        out = choice_problems(self, prefix)
        if self.timeout < 1:
            out.append(f"{prefix}.timeout={self.timeout}: must be >= 1 second.")
        return out


@dataclass
class EvalConfig:
    """``nemo-dcod eval``: checkpoints x benchmarks -> results.json, results.md and scores.png."""

    models: list[ModelEntry] = field(default_factory=list)
    """Checkpoints to evaluate, side by side in one table and one plot."""
    benchmarks: list[BenchmarkEntry] = field(default_factory=list)
    """Benchmarks to run every model on."""
    compare_with: list[str] = field(default_factory=list)
    """results.json files of earlier eval runs, put beside this run's models in the table and plot
    (comparison mode; with no models, only these are tabulated)."""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """The user message; {problem} is replaced by the problem text (no other braces are special)."""
    use_chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template (instruct models); false: raw text (base models)."""
    chat_template: str | None = None
    """A Jinja chat template (or a file holding one) replacing the tokenizer's; null: the tokenizer's."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3."""
    system_prompt: str | None = None
    """A system message before the prompt; null: none."""
    sampling: SamplingSection = field(default_factory=SamplingSection)
    grading: GradingSection = field(default_factory=GradingSection)
    backend: str = field(default="auto", metadata={"choices": ("auto", "transformers", "vllm")})
    """Generation engine: vllm (GPU, if installed), transformers, or auto (vllm when installed and a
    GPU is there, else transformers)."""
    batch_size: int = 16
    """transformers: sequences generated together."""
    dtype: str = field(default="auto", metadata={"choices": ("auto", "float32", "bfloat16", "float16")})
    """Compute dtype; auto: float32 on CPU, the checkpoint's on GPU."""
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    """transformers: where the model runs; auto: cuda if available."""
    tensor_parallel_size: int = 1
    """vllm: GPUs one model is split over."""
    gpu_memory_utilization: float = 0.9
    """vllm: fraction of GPU memory it may take."""
    max_model_len: int | None = None
    """vllm: context length to allocate for; null: the model's."""
    trust_remote_code: bool = False
    """Allow checkpoints that ship their own modelling code."""
    save_completions: bool = True
    """Keep every completion's text in results.json (false: answers and verdicts only, a smaller file)."""
    progress: bool = True
    """Show a progress bar while generating."""
    plot: bool = True
    """Draw scores.png (needs matplotlib: pip install -e '.[eval]')."""
    out_dir: str = "runs/eval"
    """Where config.yaml, results.json, results.md and scores.png go."""

    def problems(self) -> list[str]:
        """Every problem of this config, each naming the field and how to fix it."""
        out = choice_problems(self)
        out.extend(self.sampling.problems())
        out.extend(self.grading.problems())
        if not self.models and not self.compare_with:
            out.append("models: list at least one checkpoint (or compare_with: earlier results.json files).")
        if self.models and not self.benchmarks:
            out.append("benchmarks: list at least one benchmark to evaluate the models on.")
        labels: dict[str, int] = {}
        for i, model in enumerate(self.models):
            if not model.path:
                out.append(f"models[{i}].path: set the Hugging Face checkpoint directory.")
                continue
            label = model.resolved_label()
            if label in labels:
                out.append(
                    f"models[{i}]: label {label!r} is also models[{labels[label]}]'s; set models[{i}].label."
                )
            labels[label] = i
        names: dict[str, int] = {}
        for i, bench in enumerate(self.benchmarks):
            out.extend(bench.problems(f"benchmarks[{i}]"))
            if bench.name in names:
                out.append(f"benchmarks[{i}].name={bench.name!r}: also benchmarks[{names[bench.name]}]'s.")
            names[bench.name] = i
        if "{problem}" not in self.prompt_template:
            out.append("prompt_template: must contain {problem} (where the problem text goes).")
        if self.batch_size < 1:
            out.append(f"batch_size={self.batch_size}: must be >= 1.")
        if self.tensor_parallel_size < 1:
            out.append(f"tensor_parallel_size={self.tensor_parallel_size}: must be >= 1.")
        if not 0 < self.gpu_memory_utilization <= 1:
            out.append(f"gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1].")
        if self.backend == "vllm" and self.device == "cpu":
            out.append("backend=vllm with device=cpu: vLLM runs on GPUs here; set backend=transformers.")
        if not self.out_dir:
            out.append("out_dir: must not be empty.")
        return out
