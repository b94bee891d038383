"""The final answer of a solution, and a normalised string form of it.

The one place answers are extracted: ``eval`` grades model completions with it, and ``prepare``'s
correctness filter (through :mod:`nemo_dcod.data.answers`) keeps a trace only if the answer found
here matches its reference. In the order :func:`find_answer` tries them:

1. ``boxed``: the content of the *last* ``\\boxed{...}`` or ``\\fbox{...}``, nested braces
   allowed (``\\boxed{\\frac{1}{2}}``), also the brace-less ``\\boxed 5``. A last box cut off by
   the length limit is no answer: an earlier box is an intermediate result, not the final one.
2. ``gsm8k``: the rest of the line after GSM8K's last ``####``.
3. fallback (``eval`` only; off for ``prepare``, where a guess must not keep a trace): the text
   after the last "answer is" / "answer:", else the last number in the text (a number inside a
   word, like ``w12``, is not one).

:func:`normalize_answer` is the string comparison that needs no parser: LaTeX spacing, ``$``,
``\\text{}`` wrappers, thousands separators, ``\\%`` and degree signs removed, ``\\dfrac`` and
``\\tfrac`` written ``\\frac``, numbers in one format. :mod:`nemo_dcod.eval.grading` tries it first
and then math-verify. Pure standard library: importing this module is instant.
"""

from __future__ import annotations

import math
import re
from typing import Literal

__all__ = [
    "AnswerSource",
    "ExtractionMode",
    "answers_match",
    "extract_answer",
    "extract_boxed",
    "extract_fallback",
    "extract_gsm8k",
    "find_answer",
    "normalize_answer",
    "strip_math_delimiters",
]

ExtractionMode = Literal["auto", "boxed", "gsm8k"]
AnswerSource = Literal["boxed", "gsm8k", "answer_is", "last_number"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}``, braces balanced.

    Returns:
        The content (not stripped of inner LaTeX), or None if there is no box, or the last one is
        cut off (unbalanced braces) or empty.
    """
    start = -1
    command = ""
    for name in _BOX_COMMANDS:
        # `\boxed` but not `\boxedfoo`: the next character must not be a letter.
        for match in re.finditer(re.escape(name) + r"(?![A-Za-z])", text):
            if match.start() > start:
                start, command = match.start(), name
    if start < 0:
        return None
    i = start + len(command)
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        # `\boxed 5`: one token, up to whitespace or a math delimiter.
        token = re.match(r"[^\s$]+", text[i:])
        return (token.group(0).rstrip(".") or None) if token else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                content = text[i + 1 : j].strip()
                return content or None
    return None  # unbalanced: the answer was cut off


def extract_gsm8k(text: str) -> str | None:
    """The rest of the line after the last ``####``; None if there is none or it is empty."""
    at = text.rfind("####")
    if at < 0:
        return None
    lines = text[at + 4 :].strip().splitlines()
    answer = lines[0].strip().rstrip(".").strip() if lines else ""
    return answer or None


_ANSWER_IS = re.compile(r"(?i)\b(?:final\s+answer|answer)\s*(?:is|:)\s*(?:[:=]\s*)?")
# A sentence ends at a period followed by a space or the end; a decimal point never does.
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def extract_fallback(text: str) -> tuple[str, AnswerSource] | None:
    """The text after the last "answer is"/"answer:" (to the end of its sentence), else the last
    number (thousands separators removed); None if there is neither."""
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        rest = text[matches[-1].end() :].strip().splitlines()
        if rest:
            sentence = _SENTENCE_END.split(rest[0], maxsplit=1)[0]
            answer = strip_math_delimiters(sentence).strip().rstrip(".,;:!").strip()
            if answer:
                return answer, "answer_is"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", ""), "last_number"
    return None


def find_answer(
    text: str, mode: ExtractionMode = "auto", fallback: bool = False
) -> tuple[str | None, AnswerSource | None]:
    """The final answer of ``text`` and where it was found.

    Args:
        text: a solution (a model completion, a teacher trace, a reference solution).
        mode: boxed: only ``\\boxed{}``; gsm8k: only ``####``; auto: boxed, else ``####``.
        fallback: then try "answer is ..." and the last number.

    Returns:
        ``(answer, source)``, or ``(None, None)`` when nothing was found.
    """
    if mode in ("auto", "boxed"):
        boxed = extract_boxed(text)
        if boxed is not None:
            return boxed, "boxed"
    if mode in ("auto", "gsm8k"):
        marked = extract_gsm8k(text)
        if marked is not None:
            return marked, "gsm8k"
    if fallback:
        found = extract_fallback(text)
        if found is not None:
            return found
    return None, None


def extract_answer(text: str, mode: str = "auto", fallback: bool = False) -> str | None:
    """The final answer of ``text`` (see :func:`find_answer`); None if there is none."""
    if mode not in ("auto", "boxed", "gsm8k"):
        raise ValueError(f"extraction mode {mode!r}: must be one of auto, boxed, gsm8k.")
    return find_answer(text, mode, fallback)[0]  # type: ignore[arg-type]


_DELIMITERS = re.compile(r"^\s*(?:\$\$?|\\\(|\\\[)\s*|\s*(?:\$\$?|\\\)|\\\])\s*$")


def strip_math_delimiters(answer: str) -> str:
    """``$x$``, ``$$x$$``, ``\\(x\\)``, ``\\[x\\]`` -> ``x`` (outer delimiters only)."""
    return _DELIMITERS.sub("", answer)


_TEXT = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[!,;: ]|\\left|\\right|\\displaystyle|\s+")
_THOUSANDS = re.compile(r"(?<=\d)(?:,|\{,\})(?=\d{3}(?:\D|$))")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")


def normalize_answer(answer: str) -> str:
    """A canonical string: LaTeX spacing and wrappers removed; numbers in one format."""
    s = _TEXT.sub(r"\1", answer.strip())
    s = s.replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s).replace("\\%", "").replace("%", "")
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
    """Whether two final answers are the same string after :func:`normalize_answer`.

    The parser-free check; :func:`nemo_dcod.eval.grading.answers_equal` adds math-verify.
    """
    return normalize_answer(predicted) == normalize_answer(reference)
