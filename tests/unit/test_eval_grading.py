"""Equivalence grading on a fixture of tricky answers, and the per-comparison timeout (main thread:
math-verify's signal alarm; other threads: a grading child process)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from nemo_dcod.eval.grading import Grader, Verdict, math_verify_available

pytestmark = pytest.mark.skipif(not math_verify_available(), reason="needs math-verify (the eval extra)")

# (predicted, reference, verdict): what a careful human grader would say.
TRICKY: list[tuple[str | None, str, bool]] = [
    # fractions
    ("\\frac{1}{2}", "0.5", True),
    ("1/2", "\\frac12", True),
    ("\\dfrac{3}{4}", "\\frac{3}{4}", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("\\frac{1}{2}", "\\frac{2}{1}", False),
    ("0.333", "\\frac{1}{3}", False),  # a rounded decimal is not the fraction
    # mixed numbers
    ("2\\frac{1}{2}", "\\frac{5}{2}", True),
    ("2 \\frac{1}{2}", "2.5", True),
    ("2\\frac{1}{2}", "\\frac{2}{2}", False),
    # other LaTeX forms
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("3\\sqrt{3}", "\\sqrt{27}", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\pi", "3.14159", False),
    ("18,000", "18000", True),
    ("1{,}000", "1000", True),
    ("\\text{(C)}", "C", True),
    ("Evelyn", "\\text{Evelyn}", True),
    ("-5", "5", False),
    # units, currency, percent, degrees
    ("10\\text{ cm}", "10", True),
    ("10 \\mbox{ cm}", "10", True),
    ("\\$5", "5", True),
    ("50\\%", "50", True),
    ("90^\\circ", "90", True),
    ("12 \\text{ cm}", "10", False),
    # intervals
    ("(1,2]", "(1, 2]", True),
    ("(1,2]", "[1,2]", False),
    ("(-\\infty, 3)", "(-\\infty,3)", True),
    ("[0, \\infty)", "[0,\\infty)", True),
    ("x \\in (0,1)", "(0,1)", True),
    ("(0,1)", "(0,2)", False),
    # several answers: order does not matter, all must be there
    ("1, 2", "2, 1", True),
    ("x=1 \\text{ or } x=2", "1, 2", True),
    ("1, 2", "1, 2, 3", False),
    ("3", "1, 2", False),
    # equations against the expression they define
    ("y = 2x + 3", "2x+3", True),
    # no answer
    (None, "5", False),
    ("", "5", False),
    ("   ", "0", False),
]


@pytest.fixture(scope="module")
def grader() -> Any:
    with Grader("math_verify", timeout=5) as g:
        yield g


@pytest.mark.parametrize(("predicted", "reference", "expected"), TRICKY, ids=lambda v: repr(v))
def test_tricky_answers(grader: Grader, predicted: str | None, reference: str, expected: bool) -> None:
    verdict = grader.grade(predicted, reference)
    assert verdict.correct is expected, verdict
    if predicted is None or not predicted.strip():
        assert verdict == Verdict(False, "no_answer")


def test_methods_and_the_string_grader() -> None:
    with Grader("math_verify") as g:
        assert g.grade("\\dfrac{1}{2}", "\\frac {1}{2}") == Verdict(True, "string")  # no parser needed
        assert g.grade("0.5", "\\frac{1}{2}") == Verdict(True, "math_verify")
        assert g.grade("6", "5") == Verdict(False, "math_verify")
    strings = Grader("string")
    assert strings.grade("\\dfrac{1}{2}", "\\frac{1}{2}") == Verdict(True, "string")
    assert strings.grade("$1,000$", "1000") == Verdict(True, "string")
    assert strings.grade("0.5", "\\frac{1}{2}") == Verdict(False, "string")
    assert strings.grade(None, "1") == Verdict(False, "no_answer")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="grader='sympy'"):
        Grader("sympy")
    with pytest.raises(ValueError, match=r"timeout=0\.5"):
        Grader(timeout=0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_backend='thread'"):
        Grader(timeout_backend="thread")


# SymPy would try to evaluate this for minutes: only the timeout stops it.
HUGE = "2^{2^{2^{2^{100}}}}"


def test_timeout_in_the_main_thread() -> None:
    with Grader("math_verify", timeout=1, timeout_backend="signal") as g:
        started = time.perf_counter()
        assert g.grade(HUGE, "1") == Verdict(False, "timeout")
        assert time.perf_counter() - started < 4
        assert g.grade("\\frac{1}{2}", "0.5") == Verdict(True, "math_verify")  # alarms were reset


def test_timeout_outside_the_main_thread_uses_a_process() -> None:
    """math-verify alone raises in a thread (signal.alarm); auto moves grading to a child process."""
    results: dict[str, Any] = {}

    def work() -> None:
        try:
            with Grader("math_verify", timeout=1) as g:
                started = time.perf_counter()
                results["slow"] = g.grade(HUGE, "1")
                results["seconds"] = time.perf_counter() - started
                results["ok"] = g.grade("\\frac{1}{2}", "0.5")
                results["wrong"] = g.grade("0.4", "0.5")
            with Grader("math_verify", timeout=1, timeout_backend="signal") as g:
                g.grade("0.5", "\\frac{1}{2}")
        except Exception as exc:
            results["error"] = exc

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    assert results["slow"] == Verdict(False, "timeout")
    assert results["seconds"] < 30  # the child's start (imports SymPy) + 1 s
    assert results["ok"] == Verdict(True, "math_verify") and results["wrong"] == Verdict(False, "math_verify")
    assert isinstance(results["error"], RuntimeError) and "timeout_backend=process" in str(results["error"])
