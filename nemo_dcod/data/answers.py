"""Final answers for ``prepare``'s correctness filter: a thin door onto :mod:`nemo_dcod.eval`.

Extraction lives in :mod:`nemo_dcod.eval.answers` (one implementation for filtering traces and for
grading models): the last ``\\boxed{...}`` (nested braces allowed), or the text after GSM8K's
last ``####``; no last-number fallback here, so a trace without a marked answer is dropped rather
than guessed at. :func:`answers_match` is :func:`nemo_dcod.eval.grading.answers_equal`: equal
normalised strings, else math-verify (with its timeout) when installed (``pip install -e
'.[eval]'``), so ``0.5`` matches ``\\frac{1}{2}``; without math-verify, normalised strings only.
"""

from __future__ import annotations

from nemo_dcod.eval.answers import extract_answer, extract_boxed, extract_gsm8k, normalize_answer
from nemo_dcod.eval.grading import answers_equal as answers_match

__all__ = ["answers_match", "extract_answer", "extract_boxed", "extract_gsm8k", "normalize_answer"]
