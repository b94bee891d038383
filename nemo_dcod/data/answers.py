"""Final-answer extraction and a simple equivalence check, for ``prepare``'s correctness filter.

A stop-gap until ``eval`` brings a maintained grader (which this module will then defer to):
the answer is the content of the *last* ``\\boxed{...}`` (nested braces allowed) or the text
after GSM8K's last ``####``; two answers are equal when their normalised strings are (LaTeX
spacing, ``$``, ``\\text{}``, thousands separators and a trailing period removed), or when both
parse as the same number.
"""

from __future__ import annotations

import math
import re

__all__ = ["answers_match", "extract_answer", "extract_boxed", "extract_gsm8k", "normalize_answer"]


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}``, braces balanced; None if none."""
    best = -1
    for command in ("\\boxed", "\\fbox"):
        best = max(best, text.rfind(command + "{"), text.rfind(command + " {"))
    if best < 0:
        return None
    start = text.index("{", best) + 1
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None  # unbalanced: the answer was cut off


def extract_gsm8k(text: str) -> str | None:
    """The rest of the line after the last ``####``; None if there is none or it is empty."""
    at = text.rfind("####")
    if at < 0:
        return None
    answer = text[at + 4 :].strip().splitlines()
    return answer[0].strip() if answer and answer[0].strip() else None


def extract_answer(text: str, mode: str) -> str | None:
    """The final answer of ``text`` by ``mode``: boxed | gsm8k | auto (boxed, else gsm8k)."""
    if mode == "boxed":
        return extract_boxed(text)
    if mode == "gsm8k":
        return extract_gsm8k(text)
    boxed = extract_boxed(text)
    return boxed if boxed is not None else extract_gsm8k(text)


_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_SPACING = re.compile(r"\\[!,;: ]|\\left|\\right|\\displaystyle|\s+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")


def normalize_answer(answer: str) -> str:
    """A canonical string: LaTeX spacing and wrappers removed; numbers in one format."""
    s = _TEXT.sub(r"\1", answer.strip())
    s = s.replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACING.sub("", s)
    s = _THOUSANDS.sub("", s).rstrip(".").lower()
    try:
        value = float(s)
    except ValueError:
        return s
    if not math.isfinite(value):
        return s
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.10g}"


def answers_match(predicted: str, reference: str) -> bool:
    """Whether two final answers are equivalent after :func:`normalize_answer`."""
    return normalize_answer(predicted) == normalize_answer(reference)
