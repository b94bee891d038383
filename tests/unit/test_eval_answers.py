"""Final-answer extraction (boxed with nested braces, GSM8K ####, fallbacks) and normalisation."""

from __future__ import annotations

import pytest

from nemo_dcod.data import answers as data_answers
from nemo_dcod.eval.answers import (
    extract_answer,
    extract_boxed,
    extract_fallback,
    extract_gsm8k,
    find_answer,
    normalize_answer,
    strip_math_delimiters,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{1} then \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),  # the last box
        ("\\boxed{\\text{a {b} c}}", "\\text{a {b} c}"),  # nested braces
        ("$\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}$.", "\\left(3, \\frac{\\pi}{2}\\right)"),
        ("\\fbox{42}", "42"),
        ("first \\fbox{1}, final \\boxed {2}", "2"),  # a space before the brace
        ("The answer is $\\boxed 5$.", "5"),  # brace-less
        ("\\boxed{ 7 }", "7"),
        ("\\boxed{\\boxed{9}}", "9"),
        ("\\boxed{1} and later \\boxed{unclosed", None),  # the last box was cut off: no answer
        ("\\boxed{}", None),
        ("\\boxedsymbol{3}", None),  # another command, not a box
        ("no box here", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_extract_gsm8k_and_auto_order() -> None:
    assert extract_gsm8k("steps\n#### 1,234\nmore") == "1,234"
    assert extract_gsm8k("#### 12.") == "12"
    assert extract_gsm8k("#### \n") is None and extract_gsm8k("no marker") is None
    assert extract_gsm8k("#### 1\n#### 2") == "2"
    # auto: a box wins over ####, wherever it is.
    assert find_answer("\\boxed{7} then #### 5", "auto") == ("7", "boxed")
    assert find_answer("#### 5", "auto") == ("5", "gsm8k")
    assert find_answer("#### 5", "boxed") == (None, None)
    assert find_answer("\\boxed{7}", "gsm8k") == (None, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the final answer is $\\frac{3}{4}$. Done.", ("\\frac{3}{4}", "answer_is")),
        ("The answer is 3.5.", ("3.5", "answer_is")),
        ("Answer: 12 apples\nCheck: fine", ("12 apples", "answer_is")),
        ("first the answer is 1; no, the answer is 2.", ("2", "answer_is")),
        ("We get 12 then 1,024 and finally -3.25 here", ("-3.25", "last_number")),
        ("3/4 of 120 is 90", ("90", "last_number")),
        ("w12 w7 w250", None),  # numbers inside words are not numbers
        ("nothing numeric", None),
    ],
)
def test_fallback(text: str, expected: tuple[str, str] | None) -> None:
    assert extract_fallback(text) == expected


def test_fallback_only_when_asked_and_after_markers() -> None:
    text = "We compute 6 * 7 = 42 and the answer is 42."
    assert find_answer(text) == (None, None)
    assert find_answer(text, fallback=True) == ("42", "answer_is")
    assert find_answer("x = 3 then \\boxed{4}", fallback=True) == ("4", "boxed")
    assert find_answer("x = 3 then #### 4", fallback=True) == ("4", "gsm8k")
    assert extract_answer("Total: 1,200 meters", fallback=True) == "1200"
    with pytest.raises(ValueError, match="must be one of auto, boxed, gsm8k"):
        extract_answer("x", "last")


def test_normalisation() -> None:
    assert normalize_answer("$1,234.$") == "1234" and normalize_answer("\\text{ 0.50 }") == "0.5"
    assert normalize_answer("\\dfrac{1}{2}") == normalize_answer("\\frac {1}{2}") == "\\frac{1}{2}"
    assert normalize_answer("90^\\circ") == normalize_answer("90^{\\circ}") == "90"
    assert normalize_answer("50\\%") == "50" and normalize_answer("1{,}000") == "1000"
    assert normalize_answer("\\left( 1, 2 \\right)") == "(1,2)"
    assert normalize_answer("\\text{Evelyn}") == "evelyn" and normalize_answer("inf") == "inf"
    assert strip_math_delimiters("$$x+1$$") == "x+1" and strip_math_delimiters("\\(x\\)") == "x"
    assert strip_math_delimiters("\\[ 5 \\]") == "5" and strip_math_delimiters("a$b") == "a$b"


def test_prepare_uses_the_eval_extraction() -> None:
    """data/answers.py is a door onto eval's: one implementation, and no fallback for prepare."""
    assert data_answers.extract_boxed is extract_boxed
    assert data_answers.extract_answer("the answer is 5", "auto") is None
    assert data_answers.answers_match("\\dfrac{1}{2}", "\\frac {1}{2}")
    assert data_answers.answers_match("0.5", "\\frac{1}{2}")  # math-verify, installed by the eval extra
    assert not data_answers.answers_match("12", "13")
