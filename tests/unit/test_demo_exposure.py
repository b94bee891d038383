"""ExAccErr against the program teacher, on students whose distributions are known in closed form.

- A student *equal* to the teacher: KL = 0 at every step on either kind of prefix (R = ε = 0).
- A student that is the teacher smoothed towards uniform, *the same way in every state*: its error
  does not depend on whose prefix it runs on, so ExAccErr ≈ 0 (up to prefix sampling noise).
- A student that is teacher-like on the teacher's paths but lost (uniform) once a prefix leaves
  them: it samples off-path tokens itself, so its own prefixes cost far more than the teacher's,
  and ExAccErr is large. The measure must tell these two apart.
- The per-step KL equals a float64 reference, ignoring the padding rows of a model's vocabulary.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from nemo_dcod.demo.exposure import LogProbFn, exposure_bias, step_kl
from nemo_dcod.demo.task import Problem, TaskVocab, sample_problems
from nemo_dcod.demo.teacher import ProgramTeacher

VOCAB = TaskVocab(10)
PADDED = 32  # a model's vocabulary is padded past the tokenizer's
PROMPT = 5  # any fixed prompt length: the students below read only the response part


def _setup(n: int = 96) -> tuple[ProgramTeacher, list[Problem], list[list[int]]]:
    teacher = ProgramTeacher(VOCAB, shortcut_prob=0.6, step_error=0.05, shortcut_error=0.2, noise=1e-3)
    problems = sample_problems(n, 3, 10, random.Random(0))
    prompts = [[VOCAB.ids["<s>"]] * PROMPT for _ in problems]
    return teacher, problems, prompts


def _student(
    teacher: ProgramTeacher, problems: list[Problem], alpha: float, lost_off_path: bool = False
) -> LogProbFn:
    """``q = (1 - alpha) p + alpha u`` per state; with ``lost_off_path``, uniform once a prefix holds a
    token the teacher gave probability < 0.01 (a state off the teacher's paths)."""
    uniform = np.full(PADDED, 1.0 / PADDED)

    def fn(ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty(ids.shape[0], ids.shape[1], PADDED, dtype=torch.float64)
        for n in range(ids.shape[0]):
            response = ids[n, PROMPT:].tolist()
            for s in range(ids.shape[1]):
                prefix = response[: max(s + 1 - PROMPT, 0)]
                off = any(
                    tok >= len(VOCAB) or teacher.distribution(problems[n], prefix[:t])[tok] < 0.01
                    for t, tok in enumerate(prefix)
                )
                p = np.zeros(PADDED)
                p[: len(VOCAB)] = teacher.distribution(problems[n], prefix)
                q = uniform if (lost_off_path and off) else (1 - alpha) * p + alpha * uniform
                out[n, s] = torch.from_numpy(np.log(q))
        return out

    return fn


def test_step_kl_matches_reference_and_ignores_padding_rows() -> None:
    p = np.array([0.5, 0.3, 0.2, 0.0])
    logits = torch.tensor([0.1, -0.4, 1.2, 0.3, 2.0, -1.0], dtype=torch.float64)  # 2 padding rows
    logq = torch.log_softmax(logits, -1)
    expected = sum(p[v] * (math.log(p[v]) - float(logq[v])) for v in range(3))
    assert step_kl(p, logq) == pytest.approx(expected, abs=1e-14)


def test_student_equal_to_teacher_has_zero_kl_everywhere() -> None:
    teacher, problems, prompts = _setup(24)

    def exact(ids: torch.Tensor) -> torch.Tensor:
        out = torch.full((ids.shape[0], ids.shape[1], PADDED), -math.inf, dtype=torch.float64)
        for n in range(ids.shape[0]):
            response = ids[n, PROMPT:].tolist()
            for s in range(ids.shape[1]):
                p = teacher.distribution(problems[n], response[: max(s + 1 - PROMPT, 0)])
                out[n, s, : len(VOCAB)] = torch.from_numpy(np.log(np.where(p > 0, p, 1e-300)))
        return out

    result = exposure_bias(exact, teacher, problems, prompts, seed=0)
    assert result.length == teacher.max_response_tokens(3)
    assert result.r == pytest.approx(0.0, abs=1e-12) and result.epsilon == pytest.approx(0.0, abs=1e-12)


def test_exaccerr_is_near_zero_for_a_uniform_error_and_large_for_drift() -> None:
    teacher, problems, prompts = _setup()
    steady = exposure_bias(_student(teacher, problems, alpha=0.05), teacher, problems, prompts, seed=1)
    drifting = exposure_bias(
        _student(teacher, problems, alpha=0.05, lost_off_path=True), teacher, problems, prompts, seed=1
    )
    assert steady.epsilon > 0
    assert abs(steady.exaccerr_percent) < 15, steady.exaccerr_percent
    assert drifting.exaccerr_percent > 100, drifting.exaccerr_percent
    # The curve's last point is the reported value, and R(l) = l·ε(l)·(1 + ExAccErr/100).
    for result in (steady, drifting):
        assert result.exaccerr_curve[-1] == result.exaccerr_percent
        assert result.r == pytest.approx(
            result.length * result.epsilon * (1 + result.exaccerr_percent / 100), rel=1e-9
        )


def test_prompts_of_different_lengths_are_rejected() -> None:
    teacher, problems, _ = _setup(2)
    with pytest.raises(ValueError, match="one length"):
        exposure_bias(_student(teacher, problems, 0.1), teacher, problems, [[1, 2], [1]], seed=0)
