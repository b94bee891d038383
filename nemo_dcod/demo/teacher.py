"""The demo's teacher: a stochastic program whose next-token distribution is known for *any* prefix.

Why a program and not a trained model: the exposure-bias measure ExAccErr (:mod:`.exposure`)
needs the teacher's distribution ``p(. | prefix)`` on prefixes the *student* wrote, and the
teacher's exact per-token log-probs are what ``prepare`` stores with every trace (what a
generation engine reports for a real teacher). A program gives both exactly, with no sampling
noise in the reference, and at no training cost.

How it writes a response to a :class:`~.task.Problem` (see :mod:`.task` for the two styles):

1. The style word: ``shortcut`` with probability ``shortcut_prob``, else ``stepwise``.
2. Every later position is a *slot* of that style's layout: a copy (an operand or operator from
   the problem, the previous line's result, the final answer), fixed markup (``=``, ``;``,
   ``####``, ``</s>``), or a *result*. A result is the correct value of the line *as written so
   far* with probability ``1 - error``, else one of the other digits uniformly. ``error`` is
   ``step_error`` per stepwise line and ``shortcut_error`` for the one-shot answer: the teacher
   itself slips more often on the shortcut, so the correctness filter removes more shortcut
   traces. Reading the written prefix (not the true values) is what makes it define a sensible
   continuation of a student's prefix: after a student's wrong intermediate result the teacher
   carries on from that result, as a teacher reading the student's work would.
3. The program's choice is mixed with ``noise`` spread uniformly over the words a response can
   contain (:attr:`~.task.TaskVocab.response_ids`): p > 0 on every one of them, so the per-step KL
   to a student is finite, and the traces contain a few genuinely off-program tokens.

Positions past the layout's end (a student that does not stop) intend ``</s>``; a token that is
not what its slot expects (a student's garbage) is read with the problem's value instead, so every
prefix has exactly one well-defined ``p``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nemo_dcod.demo.task import OPERATORS, Problem, TaskVocab, apply

__all__ = ["ProgramTeacher", "TeacherTrace"]


@dataclass(frozen=True)
class TeacherTrace:
    """One response as the teacher wrote it."""

    problem: Problem
    token_ids: list[int]
    """Response tokens, ending with ``</s>`` (the end of the assistant turn)."""
    logprobs: list[float]
    """``log p(token_ids[t] | problem, token_ids[:t])``, exact (float64 computed)."""
    text: str
    """The response words without the final ``</s>``."""
    style: str
    """``stepwise`` or ``shortcut``: the first word."""
    answer: int | None
    """The digit after the last ``####``; None if there is none."""

    @property
    def correct(self) -> bool:
        """Whether the final answer equals the problem's."""
        return self.answer == self.problem.answer()


class ProgramTeacher:
    """``p(next token | problem, response prefix)`` of the program described in the module docstring.

    Args:
        vocab: the task's vocabulary.
        shortcut_prob: probability of choosing the shortcut style.
        step_error: probability that a stepwise line's result is a wrong digit.
        shortcut_error: probability that the shortcut's one-shot result is a wrong digit.
        noise: probability mass spread uniformly over the response words at every position.
    """

    def __init__(
        self, vocab: TaskVocab, shortcut_prob: float, step_error: float, shortcut_error: float, noise: float
    ) -> None:
        for name, value in (
            ("shortcut_prob", shortcut_prob),
            ("step_error", step_error),
            ("shortcut_error", shortcut_error),
        ):
            if not 0 <= value <= 1:
                raise ValueError(f"{name}={value}: must be a probability in [0, 1].")
        if not 0 < noise < 1:
            raise ValueError(f"noise={noise}: must be in (0, 1) (0 would make the KL to a student infinite).")
        self.vocab = vocab
        self.shortcut_prob = shortcut_prob
        self.step_error = step_error
        self.shortcut_error = shortcut_error
        self.noise = noise
        self._noise_row = np.zeros(len(vocab), dtype=np.float64)
        self._noise_row[vocab.response_ids] = noise / len(vocab.response_ids)

    def max_response_tokens(self, num_ops: int) -> int:
        """Tokens of the longer (stepwise) layout, ``</s>`` included."""
        return 1 + 6 * num_ops + 2

    # -- the program -------------------------------------------------------------------------

    def _result(self, correct: int, error: float) -> dict[int, float]:
        m = self.vocab.modulus
        ids = self.vocab.digit_ids
        out = {ids[d]: error / (m - 1) for d in range(m) if d != correct}
        out[ids[correct]] = 1.0 - error
        return out

    def _digit_or(self, prefix: list[int], pos: int, fallback: int) -> int:
        """The digit written at response position ``pos`` (if any), else ``fallback``."""
        value = self.vocab.digit(prefix[pos]) if pos < len(prefix) else None
        return fallback if value is None else value

    def _op_or(self, prefix: list[int], pos: int, fallback: str) -> str:
        word = self.vocab.word(prefix[pos]) if pos < len(prefix) else ""
        return word if word in OPERATORS else fallback

    def intended(self, problem: Problem, prefix: list[int]) -> dict[int, float]:
        """The program's next-token distribution before noise, as ``{token id: probability}``.

        Args:
            problem: the prompt.
            prefix: response token ids written so far (by anyone: teacher or student).
        """
        v = self.vocab
        if not prefix:
            return {v.ids["shortcut"]: self.shortcut_prob, v.ids["stepwise"]: 1.0 - self.shortcut_prob}
        if v.word(prefix[0]) == "shortcut":
            return self._shortcut(problem, prefix)
        return self._stepwise(problem, prefix)

    def _stepwise(self, problem: Problem, prefix: list[int]) -> dict[int, float]:
        # Layout after the style word: per operation i, six slots [a, op, d, =, r, ;] (the last
        # line ends with #### instead of ;), then [answer, </s>]. Position p of the response is
        # body slot p - 1.
        v, m, k = self.vocab, problem.modulus, len(problem.ops)
        slot = len(prefix) - 1
        line, part = divmod(slot, 6)
        if line >= k:
            if slot == 6 * k:  # the answer: a copy of the last written result
                true = problem.answer()
                return {v.ids[str(self._digit_or(prefix, 1 + 6 * (k - 1) + 4, true))]: 1.0}
            return {v.eos: 1.0}
        op, d = problem.ops[line]
        if part == 0:  # operand: the start value, or the previous line's written result
            if line == 0:
                return {v.ids[str(problem.start)]: 1.0}
            true = Problem(problem.start, problem.ops[:line], m).answer()
            return {v.ids[str(self._digit_or(prefix, 1 + 6 * (line - 1) + 4, true))]: 1.0}
        if part == 1:
            return {v.ids[op]: 1.0}
        if part == 2:
            return {v.ids[str(d)]: 1.0}
        if part == 3:
            return {v.ids["="]: 1.0}
        if part == 4:  # the result of the line as written
            base = 1 + 6 * line
            true_a = Problem(problem.start, problem.ops[:line], m).answer() if line else problem.start
            a = self._digit_or(prefix, base, true_a)
            correct = apply(a, self._op_or(prefix, base + 1, op), self._digit_or(prefix, base + 2, d), m)
            return self._result(correct, self.step_error)
        return {v.ids[";" if line < k - 1 else "####"]: 1.0}

    def _shortcut(self, problem: Problem, prefix: list[int]) -> dict[int, float]:
        # Layout after the style word: [start, op_1, d_1, ..., op_k, d_k, =, result, ####, answer, </s>].
        v, m, k = self.vocab, problem.modulus, len(problem.ops)
        slot = len(prefix) - 1
        if slot == 0:
            return {v.ids[str(problem.start)]: 1.0}
        if slot <= 2 * k:
            op, d = problem.ops[(slot - 1) // 2]
            return {v.ids[op] if slot % 2 else v.ids[str(d)]: 1.0}
        if slot == 2 * k + 1:
            return {v.ids["="]: 1.0}
        if slot == 2 * k + 2:  # the one-shot result of the chain as written
            value = self._digit_or(prefix, 1, problem.start)
            for i, (op, d) in enumerate(problem.ops):
                pos = 2 + 2 * i
                value = apply(value, self._op_or(prefix, pos, op), self._digit_or(prefix, pos + 1, d), m)
            return self._result(value, self.shortcut_error)
        if slot == 2 * k + 3:
            return {v.ids["####"]: 1.0}
        if slot == 2 * k + 4:
            return {v.ids[str(self._digit_or(prefix, 2 * k + 3, problem.answer()))]: 1.0}
        return {v.eos: 1.0}

    # -- what the rest of the demo uses ------------------------------------------------------

    def distribution(self, problem: Problem, prefix: list[int]) -> np.ndarray:
        """``[V]`` float64 ``p(. | problem, prefix)`` over the task vocabulary; sums to 1."""
        row = self._noise_row.copy()
        for token, prob in self.intended(problem, prefix).items():
            row[token] += (1.0 - self.noise) * prob
        return row

    def sample(
        self, problem: Problem, rng: np.random.Generator, max_tokens: int | None = None
    ) -> TeacherTrace:
        """One response, sampled token by token from :meth:`distribution`, with exact log-probs.

        Args:
            max_tokens: stop after this many tokens even without ``</s>`` (default: the stepwise
                layout's length + 8, which the program reaches only through repeated noise).
        """
        limit = max_tokens or self.max_response_tokens(len(problem.ops)) + 8
        ids: list[int] = []
        logprobs: list[float] = []
        while len(ids) < limit:
            p = self.distribution(problem, ids)
            token = int(rng.choice(len(p), p=p))
            ids.append(token)
            logprobs.append(math.log(p[token]))
            if token == self.vocab.eos:
                break
        words = [self.vocab.word(t) for t in ids if t != self.vocab.eos]
        answer = None
        if "####" in words:
            after = len(words) - words[::-1].index("####")
            answer = self.vocab.digit(self.vocab.ids.get(words[after], -1)) if after < len(words) else None
        return TeacherTrace(
            problem=problem,
            token_ids=ids,
            logprobs=logprobs,
            text=" ".join(words),
            style=words[0] if words else "",
            answer=answer,
        )
