"""The demo's task and program teacher: what the rest of the demo relies on.

- The tokenizer is a real HF fast tokenizer whose ids are the task vocabulary's, and the chat
  template is prefix-stable (prepare's requirement).
- ``p(. | prefix)`` is a distribution for every prefix (teacher-written, garbage, overlong, ids
  outside the vocabulary), positive on every response word and zero elsewhere.
- The log-probs a trace reports are ``log p`` of its tokens recomputed from scratch.
- The program: correct traces in both layouts, the style mix and the error rates it is given,
  and continuation from a student's wrong intermediate result.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from nemo_dcod.demo.task import Problem, TaskVocab, build_tokenizer, sample_problems
from nemo_dcod.demo.teacher import ProgramTeacher

VOCAB = TaskVocab(10)


def _teacher(**kw: float) -> ProgramTeacher:
    args = {"shortcut_prob": 0.6, "step_error": 0.02, "shortcut_error": 0.2, "noise": 1e-3, **kw}
    return ProgramTeacher(VOCAB, **args)


def _ids(text: str) -> list[int]:
    return [VOCAB.ids[w] for w in text.split()]


def test_tokenizer_round_trips_and_template_is_prefix_stable(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    build_tokenizer(VOCAB, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "stepwise 3 + 4 = 7 ; 7 - 2 = 5 #### 5"
    assert tok(text, add_special_tokens=False)["input_ids"] == _ids(text)
    assert tok.decode(_ids(text)) == text
    msgs = [{"role": "user", "content": "3 + 4 - 2"}, {"role": "assistant", "content": text}]
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert full.startswith(prompt) and full == prompt + text + " </s> "


def test_problems_are_distinct_and_held_out() -> None:
    rng = random.Random(0)
    train = sample_problems(500, 3, 10, rng)
    held = sample_problems(100, 3, 10, rng, exclude=set(train))
    assert len(set(train)) == 500 and not set(train) & set(held)
    p = Problem(3, (("+", 4), ("-", 2), ("+", 5)), 10)
    assert p.text == "3 + 4 - 2 + 5" and p.answer() == 0
    with pytest.raises(ValueError, match="allow only 8"):
        sample_problems(9, 1, 2, rng)  # 2 starts x (2 operators x 2 operands)


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "stepwise",
        "stepwise 3 + 4 =",
        "stepwise 3 + 4 = 9 ; 9",  # a wrong intermediate result, continued
        "shortcut 3 + 4 - 2 + 5 =",
        "shortcut 3 + 4 - 2 + 5 = 0 #### 0 </s> ;",  # past the end
        "= = ; #### stepwise shortcut",  # garbage
    ],
)
def test_distribution_normalises_with_the_right_support(prefix: str) -> None:
    teacher = _teacher()
    p = teacher.distribution(Problem(3, (("+", 4), ("-", 2), ("+", 5)), 10), _ids(prefix))
    assert p.dtype == np.float64 and p.shape == (len(VOCAB),)
    assert abs(p.sum() - 1.0) < 1e-12
    support = np.zeros(len(VOCAB), dtype=bool)
    support[VOCAB.response_ids] = True
    assert (p[support] > 0).all() and (p[~support] == 0).all()
    # ids a model's padded vocabulary has beyond the tokenizer's are read as garbage, not errors
    teacher.distribution(Problem(3, (("+", 4),), 10), [VOCAB.ids["stepwise"], 200, 201])


def test_reported_logprobs_are_the_distribution_of_the_prefix() -> None:
    teacher = _teacher(noise=0.05)  # enough noise that off-program tokens occur
    rng = np.random.default_rng(0)
    problems = sample_problems(200, 3, 10, random.Random(1))
    off_program = 0
    for problem in problems:
        trace = teacher.sample(problem, rng)
        assert trace.token_ids[-1] == VOCAB.eos or len(trace.token_ids) == teacher.max_response_tokens(3) + 8
        for t, (token, lp) in enumerate(zip(trace.token_ids, trace.logprobs, strict=True)):
            p = teacher.distribution(problem, trace.token_ids[:t])
            assert lp == pytest.approx(math.log(p[token]), abs=1e-12)
            off_program += p[token] < 0.05
    assert off_program > 0


def test_program_styles_errors_and_continuation() -> None:
    teacher = _teacher(noise=1e-9, step_error=0.0, shortcut_error=0.0)
    rng = np.random.default_rng(0)
    problem = Problem(3, (("+", 4), ("-", 2), ("+", 5)), 10)
    texts = Counter(teacher.sample(problem, rng).text for _ in range(400))
    assert set(texts) == {
        "stepwise 3 + 4 = 7 ; 7 - 2 = 5 ; 5 + 5 = 0 #### 0",
        "shortcut 3 + 4 - 2 + 5 = 0 #### 0",
    }
    assert texts["shortcut 3 + 4 - 2 + 5 = 0 #### 0"] / 400 == pytest.approx(0.6, abs=0.08)
    # After a wrong intermediate result (9 instead of 7), the teacher copies it and goes on from it.
    p = teacher.distribution(problem, _ids("stepwise 3 + 4 = 9 ;"))
    assert p.argmax() == VOCAB.ids["9"]
    p = teacher.distribution(problem, _ids("stepwise 3 + 4 = 9 ; 9 - 2 ="))
    assert p.argmax() == VOCAB.ids["7"]
    # Error rates per style, as configured.
    noisy = _teacher(noise=1e-9, shortcut_prob=0.5, step_error=0.05, shortcut_error=0.3)
    problems = sample_problems(2000, 3, 10, random.Random(2))
    traces = [noisy.sample(p, rng) for p in problems]
    for style, expected in (("stepwise", 0.95**3), ("shortcut", 0.7)):
        mine = [t.correct for t in traces if t.style == style]
        assert sum(mine) / len(mine) == pytest.approx(expected, abs=0.05), style


def test_invalid_teacher_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="noise=0"):
        _teacher(noise=0.0)
    with pytest.raises(ValueError, match=r"shortcut_prob=1\.5"):
        _teacher(shortcut_prob=1.5)
