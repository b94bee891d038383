"""A seed's task data: problems, the program teacher's traces, the held-out set, the warm-up corpus.

Everything here is a function of the (resolved) task section and the seed, so two runs of a seed
write the same files. The task itself (vocabulary, tokenizer, problems, the two styles) lives in
:mod:`nemo_dcod.demo.task`, the teacher in :mod:`nemo_dcod.demo.teacher`.

**The warm-up corpus** (``start.kind=warm``) is what a pretrained student has seen before
distillation: text of the task's language written by *another process*. Here that process is a
plain "textbook": chains shorter than the task's (``start.warm_num_ops``), each solved line by
line with every line correct, and no style word::

    user:       3 + 4 - 2
    textbook:   3 + 4 = 2 ; 2 - 2 = 0 #### 0

So a warm student knows the operation table, the line layout and the ``####`` answer format, but
has never seen the task's length, the teacher's two style words, the shortcut, or a teacher error.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nemo_dcod.demo.task import OPERATORS, STYLES, Problem, TaskVocab, apply, sample_problems
from nemo_dcod.demo.teacher import ProgramTeacher, TeacherTrace
from nemo_dcod.study.config import TaskSection

__all__ = [
    "SeedTask",
    "make_task",
    "teacher_of",
    "teacher_stats",
    "textbook_response",
    "write_benchmark",
    "write_textbook",
    "write_traces",
]


@dataclass
class SeedTask:
    """One seed's problems and teacher (what every student of the seed is trained and judged on)."""

    vocab: TaskVocab
    teacher: ProgramTeacher
    train_problems: list[Problem]
    eval_problems: list[Problem]
    styles: tuple[str, ...]
    """The styles the teacher writes (probability > 0): what forced-style skill is measured for."""


def teacher_of(task: TaskSection) -> ProgramTeacher:
    """The program teacher of a resolved task section."""
    assert task.modulus is not None and task.shortcut_prob is not None and task.teacher_noise is not None
    assert task.step_error is not None and task.shortcut_error is not None
    return ProgramTeacher(
        TaskVocab(task.modulus), task.shortcut_prob, task.step_error, task.shortcut_error, task.teacher_noise
    )


def make_task(task: TaskSection, seed: int) -> SeedTask:
    """The seed's training and held-out problems (disjoint) and the teacher of ``task`` (resolved)."""
    assert task.num_ops is not None and task.modulus is not None and task.shortcut_prob is not None
    assert task.num_train_problems is not None and task.num_eval_problems is not None
    rng = random.Random(seed)
    train = sample_problems(task.num_train_problems, task.num_ops, task.modulus, rng)
    held_out = sample_problems(task.num_eval_problems, task.num_ops, task.modulus, rng, exclude=set(train))
    teacher = teacher_of(task)
    probs = {"shortcut": task.shortcut_prob, "stepwise": 1.0 - task.shortcut_prob}
    styles = tuple(s for s in STYLES if probs[s] > 0)
    return SeedTask(teacher.vocab, teacher, train, held_out, styles)


def write_traces(traces: list[TeacherTrace], path: Path) -> None:
    """The teacher's traces as JSONL records (question, answer, output, token ids, log-probs, style)."""
    with path.open("w") as f:
        for trace in traces:
            record = {
                "question": trace.problem.text,
                "answer": str(trace.problem.answer()),
                "output": trace.text,
                "token_ids": trace.token_ids,
                "logprobs": trace.logprobs,
                "style": trace.style,
            }
            f.write(json.dumps(record) + "\n")


def sample_traces(seed_task: SeedTask, seed: int) -> list[TeacherTrace]:
    """One teacher trace per training problem (the seed's sampler)."""
    rng = np.random.default_rng(seed)
    return [seed_task.teacher.sample(p, rng) for p in seed_task.train_problems]


def write_benchmark(problems: list[Problem], path: Path) -> None:
    """Held-out problems in GSM8K's public format (``question``, ``answer`` ending ``#### x``)."""
    with path.open("w") as f:
        for i, problem in enumerate(problems):
            record = {"id": f"heldout-{i}", "question": problem.text, "answer": f"#### {problem.answer()}"}
            f.write(json.dumps(record) + "\n")


def teacher_stats(traces: list[TeacherTrace]) -> dict[str, Any]:
    """Traces per style, how many are correct, and the shortcut's share after the correctness filter."""
    out: dict[str, Any] = {"traces": len(traces), "correct": sum(t.correct for t in traces)}
    for style in STYLES:
        mine = [t for t in traces if t.style == style]
        out[style] = {"traces": len(mine), "correct": sum(t.correct for t in mine)}
    kept = out["stepwise"]["correct"] + out["shortcut"]["correct"]
    out["shortcut_share_after_filter"] = out["shortcut"]["correct"] / kept if kept else float("nan")
    return out


def textbook_response(problem: Problem) -> str:
    """The warm-up corpus's solution: every line correct, no style word (``3 + 4 = 2 ; ... #### 1``)."""
    lines, value = [], problem.start
    for op, d in problem.ops:
        result = apply(value, op, d, problem.modulus)
        lines.append(f"{value} {op} {d} = {result}")
        value = result
    return " ; ".join(lines) + f" #### {value}"


def write_textbook(lengths: list[int], num: int, modulus: int, seed: int, path: Path) -> dict[str, Any]:
    """``num`` warm-up documents (chains of the given lengths, repeats allowed) as JSONL; their counts."""
    rng = random.Random(10_000 + seed)  # not the task's problem stream
    counts: dict[int, int] = {}
    with path.open("w") as f:
        for _ in range(num):
            k = rng.choice(lengths)
            problem = Problem(
                rng.randrange(modulus),
                tuple((rng.choice(OPERATORS), rng.randrange(modulus)) for _ in range(k)),
                modulus,
            )
            counts[k] = counts.get(k, 0) + 1
            f.write(json.dumps({"question": problem.text, "output": textbook_response(problem)}) + "\n")
    return {"documents": num, "by_num_ops": {str(k): v for k, v in sorted(counts.items())}}
