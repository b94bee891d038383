"""What a generate run made: per-shard counts, the run's report, and the prepare config for it.

Each shard's meta carries its counts (:func:`shard_stats`); the report adds them up over every
shard (:func:`aggregate`): problems, samples, samples written, generated tokens, finish reasons,
empty responses, *usable* samples (ended by an end-of-sequence token or a stop string, with a
non-empty response: what a student can be trained on), correct samples among the graded ones,
and each problem's correct fraction (with a histogram of those fractions). The worker that finds
every shard done writes ``report.json`` and, when the run produced usable traces,
``prepare.yaml``: a complete ``nemo-dcod prepare`` config whose field mapping reads the traces
with their teacher log-probs, so ``nemo-dcod prepare --config <out_dir>/prepare.yaml`` needs no
mapping of its own.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["aggregate", "format_report", "prepare_config_text", "shard_stats"]

_BUCKETS = ((0.0, "0"), (0.25, "(0, 0.25]"), (0.5, "(0.25, 0.5]"), (0.75, "(0.5, 0.75]"), (1.0, "(0.75, 1)"))


def shard_stats(samples: list[dict[str, Any]], written: int, problems: int) -> dict[str, Any]:
    """A shard's counts from its samples (every generated sample, written or not).

    Args:
        samples: per sample ``{id, correct, finish_reason, num_tokens}`` (``correct`` None when
            ungraded).
        written: samples written to the shard (all, or the correct ones with ``keep=correct``).
        problems: problems in the shard.
    """
    per_problem: dict[str, list[int]] = {}
    finish: Counter[str] = Counter()
    tokens = empty = usable = correct = graded = 0
    for s in samples:
        finish[s["finish_reason"]] += 1
        tokens += s["num_tokens"]
        empty += s["num_tokens"] == 0
        usable += s["finish_reason"] == "stop" and s["num_tokens"] > 0
        if s["correct"] is not None:
            graded += 1
            correct += bool(s["correct"])
            row = per_problem.setdefault(s["id"], [0, 0])
            row[0] += bool(s["correct"])
            row[1] += 1
    return {
        "problems": problems,
        "samples": len(samples),
        "written": written,
        "tokens": tokens,
        "finish_reasons": dict(sorted(finish.items())),
        "empty": empty,
        "usable": usable,
        "graded": graded,
        "correct": correct,
        "per_problem_correct": per_problem,
    }


def aggregate(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """The report over ``metas`` (each shard's meta, as written)."""
    totals: Counter[str] = Counter()
    finish: Counter[str] = Counter()
    per_problem: dict[str, list[int]] = {}
    seconds = 0.0
    for meta in metas:
        stats = meta["stats"]
        for name in ("problems", "samples", "written", "tokens", "empty", "usable", "graded", "correct"):
            totals[name] += stats[name]
        finish.update(stats["finish_reasons"])
        per_problem.update(stats["per_problem_correct"])
        seconds += meta.get("seconds", 0.0)
    fractions = {pid: c / n for pid, (c, n) in per_problem.items() if n}
    histogram = dict.fromkeys([label for _, label in _BUCKETS] + ["1"], 0)
    for f in fractions.values():
        label = "1" if f == 1 else next(lab for upper, lab in _BUCKETS if f <= upper)
        histogram[label] += 1
    samples = totals["samples"]
    return {
        "shards": len(metas),
        **{k: totals[k] for k in ("problems", "samples", "written", "tokens", "empty", "usable")},
        "finish_reasons": dict(sorted(finish.items())),
        "graded": totals["graded"],
        "correct": totals["correct"],
        "correct_fraction": totals["correct"] / totals["graded"] if totals["graded"] else None,
        "problems_with_a_correct_sample": sum(1 for c, _ in per_problem.values() if c),
        "per_problem_correct_fraction": fractions,
        "per_problem_histogram": histogram,
        "mean_tokens_per_sample": totals["tokens"] / samples if samples else 0.0,
        "generation_seconds": seconds,
        "tokens_per_second": totals["tokens"] / seconds if seconds else None,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a few printed lines."""
    finish = ", ".join(f"{k} {v}" for k, v in report["finish_reasons"].items()) or "none"
    lines = [
        f"  problems {report['problems']}, samples {report['samples']}, written {report['written']} "
        f"({report['shards']} shards)",
        f"  tokens {report['tokens']} ({report['mean_tokens_per_sample']:.1f} per sample); finish: {finish}; "
        f"empty {report['empty']}",
        f"  usable (ended by a stop, non-empty): {report['usable']} of {report['samples']}",
    ]
    if report["graded"]:
        hist = ", ".join(f"{k}: {v}" for k, v in report["per_problem_histogram"].items())
        lines.append(
            f"  correct: {report['correct']} of {report['graded']} graded samples "
            f"({100 * report['correct_fraction']:.1f}%); problems with a correct sample: "
            f"{report['problems_with_a_correct_sample']} of {len(report['per_problem_correct_fraction'])}"
        )
        lines.append(f"  problems by correct fraction: {hist}")
    else:
        lines.append("  correct: not graded (no fields.reference)")
    if report["tokens_per_second"]:
        lines.append(
            f"  generation: {report['generation_seconds']:.1f} s, {report['tokens_per_second']:.1f} tokens/s"
        )
    return "\n".join(lines)


def prepare_config_text(
    out_dir: Path,
    tokenizer: str,
    has_reference: bool,
    has_system: bool,
    chat_template: str | None,
    vocabulary: str,
) -> str:
    """A ``nemo-dcod prepare`` config (YAML) for the traces of ``out_dir``.

    Traces cut at ``max_new_tokens`` are left out (``cut_off: drop``: the teacher did not stop
    there, and the report calls them not usable); the sampled token ids are used as they are
    (``teacher_tokenizer_fingerprint``: prepare refuses a tokenizer with another vocabulary).

    Args:
        tokenizer: the teacher's tokenizer (the student must share it for the log-probs to align).
        has_reference: every trace carries a reference (then it is mapped, for prepare's filter).
        has_system: the traces carry a ``system`` prompt.
        chat_template: the chat template generate used in place of the tokenizer's (its text), or None.
        vocabulary: the tokenizer's vocabulary fingerprint.
    """
    from nemo_dcod.config import to_yaml
    from nemo_dcod.data.config import FieldsSection, PrepareConfig

    fields = FieldsSection(
        layout="prompt_response",
        prompt="prompt",
        response="response",
        system="system" if has_system else None,
        reference="reference" if has_reference else None,
        teacher_tokens="teacher_tokens",
        teacher_logprobs="teacher_logprobs",
        finish_reason="finish_reason",
    )
    prepare = PrepareConfig(
        inputs=[str(out_dir / "traces" / "shard-*.jsonl")],
        format="jsonl",
        fields=fields,
        tokenizer=tokenizer,
        chat_template=chat_template,
        train_on="last_assistant",
        cut_off="drop",
        teacher_tokenizer_fingerprint=vocabulary,
        out_dir=str(out_dir / "store"),
    )
    header = (
        f"# nemo-dcod prepare --config {out_dir / 'prepare.yaml'}   [seq_length=N out_dir=DIR]\n"
        "# Written by `nemo-dcod generate`: reads its traces with the teacher's per-token log-probs,\n"
        "# the sampled token ids used as they are (teacher_tokenizer_fingerprint: the tokenizer must be\n"
        "# the teacher's; a student with another one cannot use these log-probs: set it to null to\n"
        "# re-tokenize and check, or score with `nemo-dcod score`). The end-of-turn token carries the\n"
        "# teacher's log-prob of stopping. Traces cut at max_new_tokens are left out (cut_off=keep keeps\n"
        "# them, with no end-of-turn). Filter: keep=correct at generate time, or answer_filter=auto here.\n"
    )
    return header + to_yaml(prepare)
