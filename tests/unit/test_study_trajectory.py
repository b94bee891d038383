"""The token classes that ``python -m nemo_dcod.study.trajectory`` reports DisCorD's weight mass by,
on the styles task's two response forms and the long chain (the real task vocabulary), and how it
judges a greedy long-chain solution line by line."""

from __future__ import annotations

from nemo_dcod.demo.task import Problem, TaskVocab
from nemo_dcod.study.trajectory import line_errors, long_chain_classes, token_classes


def _ids(vocab: TaskVocab, text: str) -> list[int]:
    return [vocab.ids[w] for w in text.split()]


def test_stepwise_classes() -> None:
    vocab = TaskVocab(5)
    text = "stepwise 3 + 4 = 2 ; 2 - 2 = 0 ; 0 + 1 = 1 #### 1 </s>"
    classes = token_classes(_ids(vocab, text), "stepwise", 3, vocab.ids["####"])
    words = text.split(" ")
    got = {c: [w for w, k in zip(words, classes, strict=True) if k == c] for c in set(classes)}
    assert classes[0] == "style"
    assert [i for i, c in enumerate(classes) if c == "stepwise_result"] == [5, 11, 17]  # 2, 0, 1
    assert got["stepwise_result"] == ["2", "0", "1"]
    assert got["stepwise_copy"] == ["3", "4", "2", "2", "0", "1"]  # operands and carried results
    assert classes[words.index("####") + 1] == "answer" and classes[-1] == "other"


def test_shortcut_classes() -> None:
    vocab = TaskVocab(5)
    text = "shortcut 3 + 4 - 2 + 1 = 1 #### 1 </s>"
    classes = token_classes(_ids(vocab, text), "shortcut", 3, vocab.ids["####"])
    words = text.split(" ")
    assert classes[0] == "style" and classes[9] == "shortcut_result" and words[9] == "1"
    assert classes[11] == "answer" and "stepwise_result" not in classes
    assert classes.count("other") == len(words) - 3


def test_long_chain_classes() -> None:
    vocab = TaskVocab(5)
    text = "stepwise 3 + 4 = 2 ; 2 - 2 = 0 ; 0 + 1 = 1 ; 1 + 1 = 2 #### 2 </s>"
    classes = long_chain_classes(_ids(vocab, text), 4, vocab.ids["####"])
    words = text.split(" ")
    got = {c: [w for w, k in zip(words, classes, strict=True) if k == c] for c in set(classes)}
    assert classes[0] == "style"
    assert [i for i, c in enumerate(classes) if c.startswith("result")] == [5, 11, 17, 23]
    assert got["result_early"] == ["2", "0"] and got["result_late"] == ["1", "2"]  # lines 1-2 | 3-4
    assert got["carried_copy"] == ["2", "0", "1"]  # line 2..4's first operand
    assert got["prompt_copy"] == ["3", "+", "4", "-", "2", "+", "1", "+", "1"]
    assert classes[words.index("####") + 1] == "answer"
    assert sorted(got["other"]) == sorted(["="] * 4 + [";"] * 3 + ["####", "</s>"])
    # an odd chain: the early half is the larger one; a truncated trace keeps what it has
    odd = long_chain_classes(_ids(vocab, "stepwise 3 + 4 = 2 ; 2 - 2 = 0 ; 0 + 1"), 3, vocab.ids["####"])
    assert odd.count("result_early") == 2 and "result_late" not in odd and "answer" not in odd


def _words(text: str) -> list[str]:
    return text.split(" ")


def test_line_errors() -> None:
    problem = Problem(3, (("+", 4), ("-", 2), ("+", 1)), 5)  # 3 + 4 = 2 ; 2 - 2 = 0 ; 0 + 1 = 1
    right = _words("3 + 4 = 2 ; 2 - 2 = 0 ; 0 + 1 = 1 #### 1")
    assert line_errors(right, problem) == [None, None, None]
    # a wrong table result on line 1; line 2 carries it faithfully and is right on its own prefix
    assert line_errors(_words("3 + 4 = 1 ; 1 - 2 = 4 ; 4 + 1 = 0 #### 0"), problem) == ["table", None, None]
    # a carried operand that is not the previous result, an operand not the prompt's
    assert line_errors(_words("3 + 4 = 2 ; 3 - 2 = 1 ; 1 + 2 = 3 #### 3"), problem) == [
        None,
        "carry",
        "operand",
    ]
    # a broken layout breaks every later line; so does a chain ended early
    assert line_errors(_words("3 + 4 = 2 ; 2 2 = 0 ; 0 + 1 = 1 #### 1"), problem) == [
        None,
        "layout",
        "layout",
    ]
    assert line_errors(_words("3 + 4 = 2 #### 2"), problem) == ["layout", "layout", "layout"]
