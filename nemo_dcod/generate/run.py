"""``nemo-dcod generate``: problems x a teacher -> graded traces with the teacher's log-probs.

    nemo-dcod generate --config conf/generate_tiny.yaml
    nemo-dcod generate --config conf/generate_llama70b.yaml inputs='[/data/gsm8k/train.jsonl]'

Order of work: every check that needs no model (:mod:`.plan`: the teacher's files, every problem
record, prompts, lengths, this worker's shards, keys of shards already done) runs first; then the
teacher is loaded once (eval's generators, :mod:`nemo_dcod.eval.generation`), this worker's
unfinished shards are generated one at a time, each graded with eval's extraction and grading and
written atomically (:mod:`.shards`); then, if every shard of the run is done, the report and the
prepare config (:mod:`.report`). A progress line after every batch gives samples done, tokens/s
and the ETA.

One trace per line of ``traces/shard-NNNNN.jsonl``::

    {"id": "7", "sample": 0, "prompt": <the user message>, ["system": ...,] "response": <text>,
     "reference": "72" | null, "answer": "72" | null, "correct": true | false | null,
     "finish_reason": "stop" | "length", "num_tokens": 143,
     "teacher_tokens": [...ids...], "teacher_logprobs": [...]}

``response`` is the decoded ``teacher_tokens`` (special tokens kept, no clean-up of spaces),
without the end-of-turn token, which ``teacher_tokens`` keeps as its last entry (with its log-prob:
the teacher's probability of stopping there) when the trace ended with it (see :mod:`.plan`).
``teacher_tokens`` are the ids as sampled: re-tokenizing ``response`` gives other ids for some
traces (a sampled ``a``, ``b`` where the tokenizer merges ``ab``), so prepare uses the ids as they
are when its tokenizer is the teacher's (the ``prepare.yaml`` carries the vocabulary fingerprint).
``finish_reason: length`` marks a trace cut at ``max_new_tokens``: not usable (the teacher did not
stop there); the ``prepare.yaml`` leaves such traces out (``cut_off=keep`` keeps them, with no
end-of-turn). ``teacher_logprobs[t]`` is
``log_softmax(raw logits)[teacher_tokens[t]]`` in fp32: the teacher's untempered log-prob, whatever
temperature / top-p drew the token (what DisCorD's weights compare against, DESIGN.md §1).

A run is a failure (exit 1, no prepare.yaml) when it produced nothing usable: no sample ended by
a stop (every one truncated at ``max_new_tokens``, or empty), or ``keep=correct`` wrote nothing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

from nemo_dcod.config import to_yaml
from nemo_dcod.data.store import write_json_atomic
from nemo_dcod.eval.answers import ExtractionMode, find_answer
from nemo_dcod.eval.generation import Completion, Generator, SamplingParams
from nemo_dcod.eval.grading import Grader
from nemo_dcod.generate.config import GenerateConfig, GenerateError
from nemo_dcod.generate.plan import RunPlan, build_plan, describe
from nemo_dcod.generate.report import aggregate, format_report, prepare_config_text, shard_stats
from nemo_dcod.generate.shards import (
    TRACES_FORMAT,
    TRACES_VERSION,
    ShardPlan,
    clean_temp_files,
    read_meta,
    shard_done,
    write_trace_shard,
)

__all__ = ["GenerateEvent", "build_generator", "run_generate"]

LOGPROB_DIGITS = 6
"""Decimals of the stored log-probs (1e-6 absolute; the loss compares them in fp32)."""


@dataclass(frozen=True)
class GenerateEvent:
    """What :func:`run_generate` reports to its ``on_event`` hook (tests cut runs off with it)."""

    kind: Literal["batch", "record", "shard"]
    """batch: a generated batch (count: sequences of the shard so far); record: a trace written
    and flushed to the shard's temp file (count: records so far); shard: a shard finished."""
    shard: int
    count: int


class Progress:
    """One line per batch: samples done, this worker's tokens/s and the ETA."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.samples = self.tokens = 0
        self.started = time.perf_counter()
        self.label = ""

    def update(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens
        if not self.enabled:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        left = (self.total - self.samples) * elapsed / max(self.samples, 1)
        eta = time.strftime("%H:%M:%S", time.gmtime(left))
        share = 100 * self.samples / max(self.total, 1)
        print(
            f"generate: {self.label} | {self.samples}/{self.total} samples ({share:.0f}%) | "
            f"{self.tokens / elapsed:.1f} tokens/s | ETA {eta}",
            flush=True,
        )


def _device(cfg: GenerateConfig, plan: RunPlan) -> str:
    import torch

    if cfg.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{plan.slot.local_rank % torch.cuda.device_count()}"


def build_generator(cfg: GenerateConfig, plan: RunPlan) -> Generator:
    """The configured back end with the teacher loaded (eval's generators).

    Raises:
        GenerateError: backend=vllm without vLLM installed (or one too old for raw log-probs).
    """
    from nemo_dcod.eval.generation import TransformersGenerator, VLLMGenerator, resolve_backend

    try:
        backend = resolve_backend(cfg.backend, cfg.device)
        if backend == "vllm":
            return VLLMGenerator(
                cfg.teacher,
                plan.tokenizer_path,
                plan.stop_ids,
                dtype=cfg.dtype,
                tensor_parallel_size=cfg.tensor_parallel_size,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                max_model_len=cfg.max_model_len,
                seed=cfg.sampling.seed,
                progress=False,
                trust_remote_code=cfg.trust_remote_code,
                raw_logprobs=True,
            )
    except ImportError as exc:
        raise GenerateError(
            f"{exc} vLLM is not one of this package's extras (it brings its own torch build): install "
            "it into the GPU environment, or use backend=transformers."
        ) from None
    return TransformersGenerator(
        cfg.teacher,
        plan.tokenizer,
        plan.stop_ids,
        batch_size=cfg.batch_size,
        dtype=cfg.dtype,
        device=_device(cfg, plan),
        progress=False,
        trust_remote_code=cfg.trust_remote_code,
    )


def _trace(
    cfg: GenerateConfig, plan: RunPlan, grader: Grader, problem_index: int, sample: int, c: Completion
) -> dict[str, Any]:
    problem = plan.problems[problem_index]
    if c.logprobs is None:
        raise RuntimeError("the generator returned no log-probs although SamplingParams.logprobs was set")
    tokens, logprobs = list(c.token_ids), list(c.logprobs)
    if c.stop_token_id is not None and c.stop_token_id == plan.end_of_turn_id and c.stop_logprob is not None:
        tokens.append(c.stop_token_id)
        logprobs.append(c.stop_logprob)
    text: str = plan.tokenizer.decode(
        list(c.token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    answer, _ = find_answer(text, cast(ExtractionMode, cfg.grading.extraction), cfg.grading.fallback)
    correct = None if problem.reference is None else grader.grade(answer, problem.reference).correct
    record: dict[str, Any] = {"id": problem.id, "sample": sample, "prompt": plan.messages[problem_index]}
    if cfg.system_prompt is not None:
        record["system"] = cfg.system_prompt
    record.update(
        response=text,
        reference=problem.reference,
        answer=answer,
        correct=correct,
        finish_reason=c.finish_reason,
        num_tokens=c.num_tokens,
        teacher_tokens=tokens,
        teacher_logprobs=[round(x, LOGPROB_DIGITS) for x in logprobs],
    )
    return record


def _shard_meta(cfg: GenerateConfig, plan: RunPlan, shard: ShardPlan, backend: str) -> dict[str, Any]:
    return {
        "format": TRACES_FORMAT,
        "version": TRACES_VERSION,
        "shard": shard.index,
        "key": shard.key,
        "first_problem": shard.start,
        "num_problems": len(shard.problems),
        "has_reference": all(p.reference is not None for p in shard.problems),
        "teacher": cfg.teacher,
        "tokenizer": plan.tokenizer_path,
        "backend": backend,
        "dtype": cfg.dtype,
        "sampling": {**asdict(cfg.sampling), "shard_seed": shard.seed},
        "logprobs": "teacher_logprobs[t] = log_softmax(raw logits)[teacher_tokens[t]], fp32 (untempered)",
        "end_of_turn_token": plan.end_of_turn_id,
        "stop_token_ids": plan.stop_ids,
        "tokenizer_vocabulary": plan.vocabulary,
        "prompt": {
            "template": cfg.prompt_template,
            "use_chat_template": cfg.use_chat_template,
            "chat_template": plan.chat_template,
            "chat_template_kwargs": cfg.chat_template_kwargs,
            "system_prompt": cfg.system_prompt,
        },
        "keep": cfg.keep,
    }


def _generate_shard(
    cfg: GenerateConfig,
    plan: RunPlan,
    shard: ShardPlan,
    generator: Generator,
    grader: Grader,
    progress: Progress,
    on_event: Callable[[GenerateEvent], None] | None,
) -> dict[str, Any]:
    s = cfg.sampling
    params = SamplingParams(
        s.temperature, s.top_p, s.samples_per_problem, s.max_new_tokens, shard.seed, tuple(s.stop), True
    )
    done = 0

    def on_batch(sequences: int, tokens: int) -> None:
        nonlocal done
        done += sequences
        progress.update(sequences, tokens)
        if on_event is not None:
            on_event(GenerateEvent("batch", shard.index, done))

    clean_temp_files(Path(cfg.out_dir), shard.index)
    started = time.perf_counter()
    ids = plan.prompt_ids[shard.start : shard.start + len(shard.problems)]
    completions = generator.generate(ids, params, on_batch=on_batch)
    seconds = time.perf_counter() - started
    records, samples = [], []
    for k, row in enumerate(completions):
        for j, completion in enumerate(row):
            record = _trace(cfg, plan, grader, shard.start + k, j, completion)
            samples.append({key: record[key] for key in ("id", "correct", "finish_reason", "num_tokens")})
            if cfg.keep == "all" or record["correct"] is not False:
                records.append(record)
    meta = _shard_meta(cfg, plan, shard, generator.name)
    meta["stats"] = shard_stats(samples, len(records), len(shard.problems))
    meta["seconds"] = seconds

    def on_record(count: int) -> None:
        if on_event is not None:
            on_event(GenerateEvent("record", shard.index, count))

    written = write_trace_shard(Path(cfg.out_dir), shard.index, records, meta, on_record)
    if on_event is not None:
        on_event(GenerateEvent("shard", shard.index, len(records)))
    return written


def _nothing_usable(report: dict[str, Any], cfg: GenerateConfig, scope: str) -> str | None:
    if report["samples"] == 0:
        return None
    if report["usable"] == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in report["finish_reasons"].items())
        return (
            f"{scope}: none of {report['samples']} samples is usable ({reasons}; empty {report['empty']}): "
            f"every one ran to sampling.max_new_tokens={cfg.sampling.max_new_tokens} or was empty. Raise "
            "sampling.max_new_tokens (within the teacher's context), or check the prompt and stop settings."
        )
    if report["written"] == 0:
        return f"{scope}: keep=correct, and none of {report['samples']} samples was graded correct."
    return None


def _finish(cfg: GenerateConfig, plan: RunPlan) -> dict[str, Any]:
    """The report of this worker's shards, and of the run once every shard is done."""
    out = Path(cfg.out_dir)
    metas = {s.index: read_meta(out, s.index) for s in plan.shards}
    complete = {i: m for i, m in metas.items() if m is not None and m.get("key") == plan.shards[i].key}
    mine = aggregate([complete[s.index] for s in plan.mine if s.index in complete])
    if len(complete) < len(plan.shards):
        problem = _nothing_usable(mine, cfg, f"worker {plan.slot.index} of {plan.slot.count}")
        print(f"generate: this worker's shards ({len(plan.mine)}):\n{format_report(mine)}")
        print(
            f"generate: {len(complete)} of {len(plan.shards)} shards done; the worker that finishes the "
            "last one writes report.json and prepare.yaml (or rerun this command once all have ended)."
        )
        if problem:  # the run fails only if no worker made anything usable (the last one decides)
            print(f"generate: WARNING: {problem}", file=sys.stderr)
        return mine
    report = aggregate([complete[i] for i in sorted(complete)])
    problem = _nothing_usable(report, cfg, "generate")
    report = {"ok": problem is None, "problem": problem, **report}
    write_json_atomic(out / "report.json", report)
    print(f"generate: report ({out / 'report.json'}):\n{format_report(report)}")
    if problem:
        raise GenerateError(problem)
    has_reference = all(m.get("has_reference") for m in complete.values())
    tokenizer = Path(plan.tokenizer_path)
    text = prepare_config_text(
        out.resolve(),
        str(tokenizer.resolve()) if tokenizer.exists() else plan.tokenizer_path,
        has_reference,
        cfg.system_prompt is not None,
        plan.chat_template,
        plan.vocabulary,
    )
    tmp = out / ".prepare.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "prepare.yaml")
    print(f"generate: traces {out / 'traces'}; next: nemo-dcod prepare --config {out / 'prepare.yaml'}")
    return report


def run_generate(
    cfg: GenerateConfig,
    *,
    generator: Generator | None = None,
    on_event: Callable[[GenerateEvent], None] | None = None,
) -> dict[str, Any]:
    """Generate this worker's unfinished shards of ``cfg`` (see the module docstring).

    Args:
        cfg: a validated config.
        generator: a back end with the teacher already loaded (benchmarks, tests); None: built from
            ``cfg`` (and closed at the end).
        on_event: called after every batch, written record and shard (:class:`GenerateEvent`).

    Returns:
        The report (of the run once every shard is done, else of this worker's shards).

    Raises:
        GenerateError: a bad input (before any generation), or nothing usable generated.
    """
    plan = build_plan(cfg)
    out = Path(cfg.out_dir)
    (out / "traces").mkdir(parents=True, exist_ok=True)
    tmp = out / f".config.yaml.{os.getpid()}.tmp"
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, out / "config.yaml")
    todo = [s for s in plan.mine if not shard_done(out, s, cfg.overwrite)]
    for line in describe(cfg, plan, len(plan.mine) - len(todo)):
        print(line, flush=True)
    if todo:
        own = generator is None
        gen = generator if generator is not None else build_generator(cfg, plan)
        total = sum(len(s.problems) for s in todo) * cfg.sampling.samples_per_problem
        progress = Progress(total, cfg.progress)
        try:
            with Grader(cfg.grading.grader, cfg.grading.timeout, cfg.grading.timeout_backend) as grader:
                for n, shard in enumerate(todo, start=1):
                    progress.label = f"shard {shard.index} ({n}/{len(todo)} of this worker's)"
                    _generate_shard(cfg, plan, shard, gen, grader, progress, on_event)
        finally:
            if own:
                gen.close()
        sys.stdout.flush()
    return _finish(cfg, plan)
