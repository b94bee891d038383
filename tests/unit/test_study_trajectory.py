"""The token classes that ``python -m nemo_dcod.study.trajectory`` reports DisCorD's weight mass by,
on the styles task's two response forms (the real task vocabulary)."""

from __future__ import annotations

from nemo_dcod.demo.task import TaskVocab
from nemo_dcod.study.trajectory import token_classes


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
