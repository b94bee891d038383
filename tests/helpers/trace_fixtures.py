"""A tiny word-level chat tokenizer and trace files, made offline, for the prepare tests.

The tokenizer splits on whitespace and punctuation (``\\boxed{12}`` is ``\\ boxed { 12 }``), so
every expected token sequence in the tests can be written by hand; its chat template is::

    <s> user PROMPT </s> <s> assistant RESPONSE </s>

:func:`make_bpe_tokenizer` is the realistic counterpart: byte-level BPE with a ChatML template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = [
    "user",
    "assistant",
    "system",
    "\\",
    "boxed",
    "{",
    "}",
    "####",
    "the",
    "answer",
    "is",
    ".",
    "frac",
    *[f"w{i}" for i in range(64)],
    *[str(i) for i in range(128)],
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def make_tokenizer(
    path: Path, chat_template: str | None = CHAT_TEMPLATE, vocab_size: int | None = None
) -> str:
    """Save the tiny tokenizer to ``path``; returns the path as a string.

    ``vocab_size``: pad the vocabulary with filler words (``x0``, ``x1``, ...) to this size (a
    real model's, e.g. Llama 3's 128256), the ids of :data:`WORDS` unchanged.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIALS, *WORDS]
    words += [f"x{i}" for i in range(max(0, (vocab_size or 0) - len(words)))]
    vocab = {t: i for i, t in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=chat_template,
    )
    fast.save_pretrained(str(path))
    return str(path)


def ids(text: str) -> list[int]:
    """Token ids of whitespace-separated words of the tiny vocabulary."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *WORDS])}
    return [vocab[w] for w in text.split()]


def record(i: int, words: int = 4, answer: int | None = None, teacher: bool = False) -> dict[str, Any]:
    """A prompt/response record whose response has ``words`` words (+ a boxed answer); with
    ``teacher``, the engine's token ids (``ids``) and log-probs (``lps``) of the response and its
    end-of-turn token, as a generation engine reports them."""
    response = " ".join(f"w{(i + k) % 64}" for k in range(words))
    if answer is not None:
        response += f" the answer is \\boxed{{{answer}}}"
    out: dict[str, Any] = {"prompt": f"w{i % 64} w{(i * 7) % 64}", "response": response, "id": i}
    if teacher:
        out["ids"] = ids(response.replace("\\boxed{", "\\ boxed { ").replace("}", " }") + " </s>")
        out["lps"] = [-0.1 - 0.01 * ((i + k) % 7) for k in range(len(out["ids"]))]
    return out


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """One JSON value per line (strings are written as they are: a way to put bad lines in)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_bpe_tokenizer(path: Path) -> str:
    """A byte-level BPE tokenizer (as GPT-2, Llama 3, Qwen) with a ChatML template, trained on a
    few sentences: merges span spaces and punctuation, tokens carry their leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "The answer is 42. Let us compute step by step: 6 times 7 equals 42.",
        "Déjà vu: naïve café owners compute sums, e.g. 12 + 30 = 42, then \\boxed{42}.",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    fast.save_pretrained(str(path))
    return str(path)


def prepare_store(root: Path, seq_length: int, vocab_size: int, packing: str = "best_fit") -> str:
    """A real store made by ``prepare`` in ``root/store``: 40 traces with the engine's log-probs,
    tokenized by the tiny tokenizer padded to ``vocab_size``; returns its path."""
    from nemo_dcod.data.config import PrepareConfig
    from nemo_dcod.data.prepare import run_prepare

    root.mkdir(parents=True, exist_ok=True)
    traces = write_jsonl(
        root / "traces.jsonl", [record(i, words=3 + i % 11, teacher=True) for i in range(40)]
    )
    cfg = PrepareConfig(
        inputs=[str(traces)],
        tokenizer=make_tokenizer(root / "tok", vocab_size=vocab_size),
        out_dir=str(root / "store"),
        seq_length=seq_length,
        packing=packing,
        records_per_shard=20,
    )
    cfg.fields.teacher_tokens, cfg.fields.teacher_logprobs = "ids", "lps"
    run_prepare(cfg, quiet=True)
    return cfg.out_dir
