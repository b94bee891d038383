"""A student's skill in each solution style, separated from its choice of style.

Greedy decoding makes the student's choice at the first response token (``stepwise`` or
``shortcut``); held-out accuracy mixes that choice with how well it executes the chosen style.
Forcing the first word and decoding the rest greedily measures the execution alone: a student
that picks the shortcut and fails, yet solves most problems when started on ``stepwise``, has the
skill and lacks the choice, which is what a distribution correction could change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nemo_dcod.demo.task import Problem

__all__ = ["forced_style_accuracy", "greedy_texts"]


def forced_style_accuracy(
    model: Any, tokenizer: Any, problems: Sequence[Problem], style: str, max_new_tokens: int
) -> float:
    """Greedy accuracy on ``problems`` with every response forced to start with ``style``.

    Args:
        model: a Hugging Face causal LM (the exported student).
        tokenizer: its tokenizer (with the task's chat template).
        problems: held-out problems; all prompts have one length, so no padding is needed.
        style: the forced first word (``stepwise`` or ``shortcut``).
        max_new_tokens: tokens generated after the style word.

    Returns:
        The fraction of problems whose answer after the last ``####`` is the right digit.
    """
    from nemo_dcod.eval.generation import encode_prompts

    _, prompts = encode_prompts(tokenizer, [p.text for p in problems])
    style_id = tokenizer.convert_tokens_to_ids(style)
    texts = greedy_texts(model, tokenizer, [[*p, style_id] for p in prompts], max_new_tokens)
    correct = 0
    for text, problem in zip(texts, problems, strict=True):
        after = text.split("####")[-1].split() if "####" in text else []
        correct += bool(after) and after[0] == str(problem.answer())
    return correct / len(problems)


def greedy_texts(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> list[str]:
    """Each prompt's greedy continuation, decoded (prompts of equal length: no padding)."""
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return list(tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True))
