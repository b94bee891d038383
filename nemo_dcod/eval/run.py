"""``nemo-dcod eval``: every model on every benchmark, then one table and one plot of them all.

    nemo-dcod eval --config conf/eval_tiny.yaml
    nemo-dcod eval --config conf/eval_tiny.yaml 'models=[{path: out/sft-hf}, {path: out/discord-hf}]'
    nemo-dcod eval --config conf/eval_tiny.yaml models=[] 'compare_with=[runs/a/results.json, b/results.json]'

Order of work: every benchmark file is read and every model path checked first, so a typo fails
in a second rather than after the first model's hour of generation. Then, per model: load it once,
generate each benchmark, extract and grade every sample, score; results.json is rewritten after
every model (a later failure keeps the finished ones). Last, earlier runs named in
``compare_with`` join this run's models in results.json, results.md and scores.png.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from nemo_dcod.config import to_yaml
from nemo_dcod.eval.answers import ExtractionMode, find_answer
from nemo_dcod.eval.benchmarks import Problem, load_problems, render_prompt
from nemo_dcod.eval.config import EvalConfig, EvalError, ModelEntry
from nemo_dcod.eval.generation import (
    Completion,
    Generator,
    SamplingParams,
    TransformersGenerator,
    VLLMGenerator,
    encode_prompts,
    load_tokenizer,
    resolve_backend,
    stop_token_ids,
)
from nemo_dcod.eval.grading import Grader
from nemo_dcod.eval.report import (
    RESULTS_FORMAT,
    average_score,
    load_results,
    markdown_table,
    merge_models,
    plot_scores,
    score_benchmark,
)

__all__ = ["grade_completions", "run_eval"]


def _sampling(cfg: EvalConfig) -> SamplingParams:
    s = cfg.sampling
    return SamplingParams(s.temperature, s.top_p, s.num_samples, s.max_new_tokens, s.seed)


def grade_completions(
    problems: list[Problem],
    completions: list[list[Completion]],
    prompts: list[str],
    grader: Grader,
    cfg: EvalConfig,
) -> dict[str, Any]:
    """A benchmark's summary and per-problem records from its completions (no model needed).

    Args:
        problems: the benchmark's problems.
        completions: per problem, its k completions.
        prompts: per problem, the prompt text the model saw.
    """
    mode = cast(ExtractionMode, cfg.grading.extraction)
    records, verdicts = [], []
    no_answer = truncated = tokens = 0
    for problem, samples, prompt in zip(problems, completions, prompts, strict=True):
        rows, correct = [], []
        for sample in samples:
            answer, source = find_answer(sample.text, mode, cfg.grading.fallback)
            verdict = grader.grade(answer, problem.reference)
            correct.append(verdict.correct)
            no_answer += answer is None
            truncated += sample.finish_reason == "length"
            tokens += sample.num_tokens
            row: dict[str, Any] = {
                "answer": answer,
                "extracted_by": source,
                "correct": verdict.correct,
                "graded_by": verdict.method,
                "num_tokens": sample.num_tokens,
                "finish_reason": sample.finish_reason,
            }
            if cfg.save_completions:
                row["completion"] = sample.text
            rows.append(row)
        verdicts.append(correct)
        records.append(
            {
                "id": problem.id,
                "location": problem.location,
                "reference": problem.reference,
                "accuracy": sum(correct) / len(correct),
                "prompt": prompt if cfg.save_completions else None,
                "meta": problem.meta,
                "samples": rows,
            }
        )
    summary = score_benchmark(verdicts, greedy=cfg.sampling.temperature == 0)
    total = sum(len(c) for c in completions)
    summary.update(
        no_answer_rate=no_answer / total,
        truncated_rate=truncated / total,
        mean_tokens=tokens / total,
        records=records,
    )
    return summary


def _check_model(entry: ModelEntry, index: int) -> None:
    path = Path(entry.path)
    if not (path / "config.json").is_file():
        raise EvalError(
            f"models[{index}].path={entry.path}: no config.json there; point it at a Hugging Face "
            "checkpoint directory (what `nemo-dcod export --hf-out DIR` writes)."
        )
    tokenizer = Path(entry.tokenizer or entry.path)
    if not any(
        (tokenizer / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        raise EvalError(
            f"models[{index}]: no tokenizer files in {tokenizer}; set models[{index}].tokenizer to the "
            "tokenizer directory."
        )


def _build_generator(cfg: EvalConfig, entry: ModelEntry, tokenizer: Any, stop_ids: list[int]) -> Generator:
    backend = resolve_backend(cfg.backend, cfg.device)
    if backend == "vllm":
        return VLLMGenerator(
            entry.path,
            entry.tokenizer or entry.path,
            stop_ids,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
            seed=cfg.sampling.seed,
            progress=cfg.progress,
            trust_remote_code=cfg.trust_remote_code,
        )
    from nemo_dcod.parallel.threads import set_cpu_threads

    set_cpu_threads()  # a no-op on a GPU machine
    return TransformersGenerator(
        entry.path,
        tokenizer,
        stop_ids,
        batch_size=cfg.batch_size,
        dtype=cfg.dtype,
        device=cfg.device,
        progress=cfg.progress,
        trust_remote_code=cfg.trust_remote_code,
    )


def evaluate_model(
    cfg: EvalConfig, entry: ModelEntry, benchmarks: Mapping[str, list[Problem]], grader: Grader
) -> dict[str, Any]:
    """One model's results entry (see :mod:`nemo_dcod.eval.report`) on every benchmark."""
    label = entry.resolved_label()
    tokenizer = load_tokenizer(entry.tokenizer or entry.path, cfg.chat_template)
    stop_ids = stop_token_ids(entry.path, tokenizer)
    generator = _build_generator(cfg, entry, tokenizer, stop_ids)
    params = _sampling(cfg)
    templates = {b.name: b.prompt_template or cfg.prompt_template for b in cfg.benchmarks}
    results: dict[str, Any] = {}
    try:
        for name, problems in benchmarks.items():
            messages = [render_prompt(templates[name], p) for p in problems]
            try:
                prompts, prompt_ids = encode_prompts(
                    tokenizer, messages, cfg.use_chat_template, cfg.system_prompt, cfg.chat_template_kwargs
                )
            except ValueError as exc:
                raise EvalError(f"models[{label}]: {exc}") from exc
            started = time.perf_counter()
            completions = generator.generate(prompt_ids, params, desc=f"{label} {name}")
            seconds = time.perf_counter() - started
            summary = grade_completions(problems, completions, prompts, grader, cfg)
            records = summary.pop("records")
            results[name] = {**summary, "seconds": seconds, "records": records}
    finally:
        generator.close()
    return {
        "path": entry.path,
        "tokenizer": entry.tokenizer or entry.path,
        "backend": generator.name,
        "sampling": asdict(cfg.sampling),
        "prompt_templates": templates,
        "use_chat_template": cfg.use_chat_template,
        "grader": grader.name,
        "average": average_score(results),
        "benchmarks": results,
    }


def _write(out_dir: Path, models: Mapping[str, Any]) -> dict[str, Any]:
    results = {
        "format": RESULTS_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "models": dict(models),
    }
    tmp = out_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(out_dir / "results.json")
    return results


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.models`` on ``cfg.benchmarks``; write and return the results.

    Writes ``config.yaml``, ``results.json``, ``results.md`` and (with matplotlib) ``scores.png``
    into ``cfg.out_dir``, prints the table and the artifact paths.

    Raises:
        EvalError: a missing model, tokenizer, benchmark file or earlier results file; a malformed
            benchmark record; a label clash with ``compare_with`` results. Raised before any model
            is loaded whenever it can be.
    """
    earlier = [(path, load_results(path)["models"]) for path in cfg.compare_with]
    for i, entry in enumerate(cfg.models):
        _check_model(entry, i)
    benchmarks: dict[str, list[Problem]] = {}
    if cfg.models:
        for bench in cfg.benchmarks:
            benchmarks[bench.name] = load_problems(
                bench.format, bench.path, bench.name, bench.split, bench.subset, bench.limit
            )
    # Label clashes with earlier results fail now, not after the generation.
    merge_models([("this run", {e.resolved_label(): None for e in cfg.models}), *earlier])

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    models: dict[str, Any] = {}
    with Grader(cfg.grading.grader, cfg.grading.timeout, cfg.grading.timeout_backend) as grader:
        for entry in cfg.models:
            models[entry.resolved_label()] = evaluate_model(cfg, entry, benchmarks, grader)
            _write(out_dir, models)
    merged = merge_models([("this run", models), *earlier])
    results = _write(out_dir, merged)
    table = markdown_table(merged)
    (out_dir / "results.md").write_text(table)
    artifacts = [out_dir / "config.yaml", out_dir / "results.json", out_dir / "results.md"]
    if cfg.plot:
        if plot_scores(merged, out_dir / "scores.png") is None:
            print("eval: matplotlib is not installed, no plot (pip install -e '.[eval]').")
        else:
            artifacts.append(out_dir / "scores.png")
    print(table)
    for path in artifacts:
        print(f"eval: wrote {path}")
    return results
