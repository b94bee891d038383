"""The demo's task: multi-step modular arithmetic, its word-level vocabulary and its tokenizer.

A problem is a start value and a chain of ``num_ops`` additions/subtractions modulo ``modulus``
(here 5, the demo's default)::

    user:       3 + 4 - 2 + 1
    stepwise:   stepwise 3 + 4 = 2 ; 2 - 2 = 0 ; 0 + 1 = 1 #### 1
    shortcut:   shortcut 3 + 4 - 2 + 1 = 1 #### 1

The two solution *styles* are the point of the task. ``stepwise`` does one operation per step: each
result token needs one table lookup (an operand copied from the line before, an operator and a
digit from the problem), which a tiny transformer learns in a few hundred steps. ``shortcut``
writes the whole answer at once: the result token is a ``num_ops``-fold composition, which the same
student cannot compute in one forward pass (measured: it stays near chance, 1/modulus, while it
learns the stepwise lines). A stepwise line is two skills: the operation table, and copying the
i-th operation from the prompt. Measured on the default student (4 layers, width 64): at modulus
10, 400 steps learned the copying but not the table (13% of lines right, chance); at modulus 5,
600 steps, SFT gets 86% of lines right with perfect copying (a 3-line solution: ~60%). Hence
modulus 5: with a student that can learn the stepwise style, its *choice* of style matters.

A teacher that mixes both (:mod:`.teacher`) therefore writes traces the student cannot all
imitate: the setting where distribution correction is supposed to matter (DESIGN.md §1), and where
plain SFT learns to pick the style it cannot execute.

The tokenizer is built here, in the run directory, as a real Hugging Face fast tokenizer (word
level, a chat template): ``prepare``, ``export`` and ``eval`` use it exactly as they would use a
production model's, so the demo exercises their tokenizer paths rather than a shortcut around them.
One word is one token, which keeps the teacher's per-token probabilities aligned with the
tokenizer's ids by construction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_TEMPLATE",
    "OPERATORS",
    "SPECIALS",
    "STYLES",
    "Problem",
    "TaskVocab",
    "build_tokenizer",
    "sample_problems",
]

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
"""Unknown, begin/end of a turn, padding: ids 0..3, as in ``examples/tiny/tokenizer``."""
ROLES = ("user", "assistant", "system")
STYLES = ("stepwise", "shortcut")
"""The first word of every response: which solution style follows."""
OPERATORS = ("+", "-")
MARKUP = ("=", ";", "####")
"""``####`` introduces the final answer, as in GSM8K: prepare's filter and eval's grader read it."""
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)
"""Prefix-stable (each shorter rendering is a prefix of the longer), as prepare requires."""


@dataclass(frozen=True)
class Problem:
    """``start op_1 d_1 op_2 d_2 ...`` modulo ``modulus``."""

    start: int
    ops: tuple[tuple[str, int], ...]
    """(operator, operand) pairs, in order."""
    modulus: int

    @property
    def text(self) -> str:
        """The user prompt: ``3 + 4 - 2 + 5``."""
        return " ".join([str(self.start), *(f"{op} {d}" for op, d in self.ops)])

    def answer(self) -> int:
        """The value of the chain, modulo ``modulus``."""
        value = self.start
        for op, d in self.ops:
            value = apply(value, op, d, self.modulus)
        return value


def apply(value: int, op: str, operand: int, modulus: int) -> int:
    """``(value op operand) mod modulus``."""
    return (value + operand if op == "+" else value - operand) % modulus


class TaskVocab:
    """The task's words and their ids (the tokenizer's vocabulary, in this order).

    Args:
        modulus: digits are the words ``0 .. modulus-1``.
    """

    def __init__(self, modulus: int) -> None:
        self.modulus = modulus
        self.words: list[str] = [
            *SPECIALS,
            *ROLES,
            *STYLES,
            *OPERATORS,
            *MARKUP,
            *(str(i) for i in range(modulus)),
        ]
        self.ids: dict[str, int] = {w: i for i, w in enumerate(self.words)}
        self.eos = self.ids["</s>"]
        self.digit_ids: list[int] = [self.ids[str(i)] for i in range(modulus)]
        # What the teacher can ever write: response words and the end of the turn. Its noise is
        # spread over these only (never over <s>, <pad>, <unk> or role words), so every token it
        # can write has p > 0 and KL(p || q) is finite; p = 0 elsewhere contributes nothing.
        self.response_ids: list[int] = [
            self.ids[w] for w in (*STYLES, *OPERATORS, *MARKUP, *(str(i) for i in range(modulus)), "</s>")
        ]

    def __len__(self) -> int:
        return len(self.words)

    def digit(self, token_id: int) -> int | None:
        """The digit a token id spells, or None (any other token, or an id outside the vocabulary)."""
        if 0 <= token_id < len(self.words):
            word = self.words[token_id]
            if word.isdigit():
                return int(word)
        return None

    def word(self, token_id: int) -> str:
        """The word of an id; ``<unk>`` for ids outside the vocabulary (a model's padding rows)."""
        return self.words[token_id] if 0 <= token_id < len(self.words) else "<unk>"


def sample_problems(
    num: int, num_ops: int, modulus: int, rng: random.Random, exclude: set[Problem] | None = None
) -> list[Problem]:
    """``num`` distinct problems, none in ``exclude`` (held-out problems never seen in training).

    Raises:
        ValueError: fewer than ``num`` distinct problems exist outside ``exclude``.
    """
    exclude = exclude or set()
    space = modulus * (len(OPERATORS) * modulus) ** num_ops
    if num > space - len(exclude):
        raise ValueError(
            f"{num} distinct problems requested, but num_ops={num_ops}, modulus={modulus} allow "
            f"only {space} ({len(exclude)} already used): raise num_ops or modulus."
        )
    out: list[Problem] = []
    seen = set(exclude)
    while len(out) < num:
        problem = Problem(
            rng.randrange(modulus),
            tuple((rng.choice(OPERATORS), rng.randrange(modulus)) for _ in range(num_ops)),
            modulus,
        )
        if problem not in seen:
            seen.add(problem)
            out.append(problem)
    return out


def build_tokenizer(vocab: TaskVocab, out_dir: Path | None = None) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` with the chat template; saved to ``out_dir`` if given.

    Words are split on whitespace and decoded joined by spaces (the Rust tokenizer's behaviour
    without a decoder), so ``decode(encode(text)) == text`` for single-spaced task text.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(vocab.ids), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
