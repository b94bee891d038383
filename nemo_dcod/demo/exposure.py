"""Exposure bias of a student against the demo's program teacher: ExAccErr, computed exactly.

MiniLLM (Gu et al., ICLR 2024, appendix B.5, after Arora et al. 2022) measures how much of a
student's error comes from running on its *own* prefixes (what happens at generation time) rather
than the teacher's (what offline distillation trains on). With teacher p and student q_θ::

    R(l)        = Σ_{t=1..l} E_{y<t ~ q_θ} E_{y_t ~ p(.|y<t)} log p(y_t|y<t) / q_θ(y_t|y<t)
    ε(l)        = (1/l) Σ_{t=1..l} E_{y<t ~ p} E_{y_t ~ p(.|y<t)} log p(y_t|y<t) / q_θ(y_t|y<t)
    ExAccErr(l) = (R(l) - l·ε(l)) / (l·ε(l)) × 100%

The inner expectation over y_t is ``KL(p(.|y<t) || q_θ(.|y<t))``. Because the demo's teacher is a
program (:mod:`.teacher`) whose ``p(.|prefix)`` is defined for any prefix, it is computed exactly
over the whole vocabulary here; only the prefixes are sampled (``num_samples`` from the student by
ancestral sampling at temperature 1, and as many from the teacher). ε(l) is also reported on its
own: the mean per-step forward KL on teacher prefixes, i.e. how well the student fits the
teacher where offline training looked.

A generation stops at ``</s>``; after it, the process has ended and contributes 0 to both sums
(the expectation of ``KL · 1[still generating at t]``). ExAccErr ≈ 0 means the student is as good
on its own prefixes as on the teacher's; large values mean it drifts into states that training
never showed it. A student equal to the teacher has KL = 0 everywhere (0/0: reported as NaN); the
unit tests check the *relative* measure on a teacher-like student instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from nemo_dcod.demo.task import Problem
from nemo_dcod.demo.teacher import ProgramTeacher

__all__ = ["Exposure", "exposure_bias", "step_kl"]

LogProbFn = Callable[[torch.Tensor], torch.Tensor]
"""``[N, S]`` token ids -> ``[N, S, V_q]`` float64 log q_θ of the next token at every position."""


@dataclass
class Exposure:
    """ExAccErr and its parts; every list is indexed by response step t = 1..max_len."""

    length: int
    """l: the number of response steps summed (the teacher's longest response)."""
    exaccerr_percent: float
    """ExAccErr(l) in percent."""
    r: float
    """R(l): summed KL on the student's own prefixes."""
    epsilon: float
    """ε(l): mean per-step KL on teacher prefixes."""
    kl_student_prefix: list[float] = field(default_factory=list)
    """E over student prefixes of KL at step t (0 once a sample has ended)."""
    kl_teacher_prefix: list[float] = field(default_factory=list)
    """E over teacher prefixes of KL at step t (0 once a trace has ended)."""
    exaccerr_curve: list[float] = field(default_factory=list)
    """ExAccErr(l') for l' = 1..l, in percent."""


def step_kl(teacher_probs: np.ndarray, student_logprobs: torch.Tensor) -> float:
    """``KL(p || q) = Σ_v p(v) (log p(v) - log q(v))`` over p's support.

    Args:
        teacher_probs: ``[V]`` float64 teacher distribution over the task vocabulary.
        student_logprobs: ``[V_q]`` float64 student log-probs, ``V_q >= V`` (the model's padded
            vocabulary; padding rows have p = 0 and drop out).
    """
    p = torch.from_numpy(teacher_probs)
    support = p > 0
    logq = student_logprobs[: p.numel()]
    return float((p[support] * (p[support].log() - logq[support])).sum())


def _kl_rows(
    teacher: ProgramTeacher,
    problems: Sequence[Problem],
    responses: list[list[int]],
    logq: torch.Tensor,
    length: int,
) -> np.ndarray:
    """``[N, length]`` KL at each response step while the response is still being written.

    ``logq[n, t]``: ``[V_q]`` student log-probs of response token t of row n given its prefix.
    """
    out = np.zeros((len(problems), length))
    for n, (problem, response) in enumerate(zip(problems, responses, strict=True)):
        for t in range(min(length, len(response))):
            out[n, t] = step_kl(teacher.distribution(problem, response[:t]), logq[n, t])
    return out


def _student_samples(
    logprob_fn: LogProbFn, prompts: torch.Tensor, length: int, eos: int, generator: torch.Generator
) -> tuple[list[list[int]], torch.Tensor]:
    """Ancestral samples from q_θ (temperature 1, full vocabulary) and the log-probs they were drawn from.

    Returns:
        per row, its response ids up to and including ``</s>``; ``[N, length, V_q]`` log q_θ.
    """
    ids = prompts
    steps = []
    done = torch.zeros(len(prompts), dtype=torch.bool)
    responses: list[list[int]] = [[] for _ in range(len(prompts))]
    for _ in range(length):
        logq = logprob_fn(ids)[:, -1]  # [N, V_q]
        steps.append(logq)
        token = torch.multinomial(logq.exp(), 1, generator=generator)[:, 0]
        for n in torch.nonzero(~done)[:, 0].tolist():
            responses[n].append(int(token[n]))
        done |= token == eos
        ids = torch.cat([ids, token[:, None]], dim=1)
        if bool(done.all()):
            break
    logq_all = torch.stack(steps, dim=1)
    if logq_all.shape[1] < length:  # every sample ended early: pad (never read, rows have ended)
        pad = logq_all[:, -1:].expand(-1, length - logq_all.shape[1], -1)
        logq_all = torch.cat([logq_all, pad], dim=1)
    return responses, logq_all


def exposure_bias(
    logprob_fn: LogProbFn,
    teacher: ProgramTeacher,
    problems: Sequence[Problem],
    prompt_ids: Sequence[Sequence[int]],
    seed: int,
    length: int | None = None,
) -> Exposure:
    """ExAccErr(l) of the student behind ``logprob_fn``, one student and one teacher prefix per problem.

    Args:
        logprob_fn: the student (see :data:`LogProbFn`); called without gradients.
        teacher: the program teacher p.
        problems: the problems whose prefixes are sampled (held-out ones).
        prompt_ids: per problem, the chat-templated prompt ids the student generates after; all of
            one length (every demo problem has the same number of operations).
        seed: seeds both samplers.
        length: l; default: the teacher's longest response.

    Raises:
        ValueError: prompts of different lengths, or no problems.
    """
    if not problems:
        raise ValueError("exposure_bias: no problems to sample prefixes for.")
    if len({len(p) for p in prompt_ids}) != 1:
        raise ValueError("exposure_bias: prompts must all have one length (same number of operations).")
    num_ops = len(problems[0].ops)
    length = length or teacher.max_response_tokens(num_ops)
    eos = teacher.vocab.eos
    prompts = torch.tensor([list(p) for p in prompt_ids], dtype=torch.long)
    with torch.no_grad():
        # Student prefixes: y<t ~ q_θ.
        gen = torch.Generator().manual_seed(seed)
        student_responses, student_logq = _student_samples(logprob_fn, prompts, length, eos, gen)
        kl_student = _kl_rows(teacher, problems, student_responses, student_logq, length)
        # Teacher prefixes: y<t ~ p, one forward over each whole trace.
        rng = np.random.default_rng(seed)
        traces = [teacher.sample(problem, rng).token_ids for problem in problems]
        width = max(len(t) for t in traces)
        padded = torch.tensor([t + [eos] * (width - len(t)) for t in traces], dtype=torch.long)
        logq = logprob_fn(torch.cat([prompts, padded], dim=1))
        start = prompts.shape[1] - 1  # the logits at the last prompt token predict response token 0
        teacher_logq = logq[:, start : start + width]
        if width < length:
            teacher_logq = torch.cat(
                [teacher_logq, teacher_logq[:, -1:].expand(-1, length - width, -1)], dim=1
            )
        kl_teacher = _kl_rows(teacher, problems, traces, teacher_logq, length)
    per_step_student = kl_student.mean(axis=0)
    per_step_teacher = kl_teacher.mean(axis=0)
    curve = []
    for steps in range(1, length + 1):
        r_l = float(per_step_student[:steps].sum())
        l_eps = float(per_step_teacher[:steps].sum())  # l · ε(l)
        curve.append((r_l - l_eps) / l_eps * 100.0 if l_eps > 0 else float("nan"))
    r = float(per_step_student.sum())
    epsilon = float(per_step_teacher.sum()) / length
    return Exposure(
        length=length,
        exaccerr_percent=curve[-1],
        r=r,
        epsilon=epsilon,
        kl_student_prefix=per_step_student.tolist(),
        kl_teacher_prefix=per_step_teacher.tolist(),
        exaccerr_curve=curve,
    )


def hf_logprob_fn(model: torch.nn.Module) -> LogProbFn:
    """A :data:`LogProbFn` of a Hugging Face causal LM (float64 log-softmax of its logits)."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids).logits
        return torch.log_softmax(logits.to(torch.float64), dim=-1)

    return fn
