"""The ``prepare`` stage's schema: traces in, a packed sample store out.

    cfg = load_config(PrepareConfig, "conf/prepare_tiny.yaml", ["seq_length=4096", "workers=8"])

Import-free on purpose (no transformers, no numpy): validating a config must be instant.
:meth:`PrepareConfig.problems` checks what can be known without reading any file; paths are
checked when the stage runs, with errors that name them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nemo_dcod.config import choice_problems

__all__ = ["FieldsSection", "PrepareConfig"]


@dataclass
class FieldsSection:
    """Where each part of a trace lives in an input record.

    Paths are dotted (``output.text``, ``choices.0.message``); an integer part indexes a list.
    """

    layout: str = field(default="prompt_response", metadata={"choices": ("prompt_response", "messages")})
    """prompt_response: one prompt and one response per record; messages: a chat list (multi-turn)."""
    prompt: str = "prompt"
    """prompt_response: the user prompt."""
    response: str = "response"
    """prompt_response: the teacher's response (what is trained)."""
    system: str | None = None
    """prompt_response: an optional per-record system prompt; null: none (or `system_prompt`)."""
    messages: str = "messages"
    """messages: the list of turns, each an object with a role and a content."""
    role_key: str = "role"
    """messages: the key of a turn's role."""
    content_key: str = "content"
    """messages: the key of a turn's content (a string, or a list of {type: text, text} parts)."""
    reference: str | None = None
    """The reference answer (for the correctness filter); null: none."""
    teacher_tokens: str | None = None
    """The generated tokens as the engine reports them: token ids (ints) or token strings."""
    teacher_logprobs: str | None = None
    """Per-token log-probs of the generated tokens (floats, parallel to teacher_tokens)."""
    teacher_entries: str | None = None
    """Alternative to the two above: one object per generated token (OpenAI's logprobs.content)."""
    teacher_token_key: str = "token"
    """teacher_entries: the key of the token (id or string)."""
    teacher_logprob_key: str = "logprob"
    """teacher_entries: the key of the log-prob."""
    finish_reason: str | None = None
    """Why the engine ended the (last) response: `length` means cut at its token limit (vLLM,
    OpenAI, SGLang's meta_info.finish_reason.type, `nemo-dcod generate`), anything else that it
    stopped; see `cut_off`. null: unknown, every response is taken as stopped."""

    def has_teacher(self) -> bool:
        """Whether records carry per-token teacher log-probs."""
        return self.teacher_logprobs is not None or self.teacher_entries is not None

    def problems(self, prefix: str = "fields") -> list[str]:
        out = choice_problems(self, prefix)
        if self.teacher_entries is not None and (
            self.teacher_tokens is not None or self.teacher_logprobs is not None
        ):
            out.append(
                f"{prefix}.teacher_entries and {prefix}.teacher_tokens/teacher_logprobs are both set: "
                "use one form (per-token objects, or two parallel lists)."
            )
        if self.teacher_tokens is not None and self.teacher_logprobs is None:
            out.append(f"{prefix}.teacher_tokens is set without {prefix}.teacher_logprobs: set both.")
        for name in ("prompt", "response", "messages", "role_key", "content_key"):
            if not getattr(self, name):
                out.append(f"{prefix}.{name}: must not be empty.")
        return out


@dataclass
class PrepareConfig:
    """``nemo-dcod prepare``: teacher traces -> tokenized, masked, packed, sharded sample store."""

    inputs: list[str] = field(default_factory=list)
    """Trace files (.jsonl, .parquet), glob patterns, or Hugging Face datasets saved to disk."""
    format: str = field(default="auto", metadata={"choices": ("auto", "jsonl", "parquet", "hf_disk")})
    """Input format; auto: by suffix (.jsonl/.json, .parquet), a directory is a saved HF dataset."""
    hf_split: str | None = None
    """hf_disk: the split of a saved DatasetDict (e.g. train); null: the dataset has one split."""
    fields: FieldsSection = field(default_factory=FieldsSection)
    tokenizer: str = ""
    """The student's Hugging Face tokenizer (a directory with tokenizer.json); must be a fast one."""
    chat_template: str | None = None
    """A Jinja chat template replacing the tokenizer's; null: the tokenizer's own."""
    system_prompt: str | None = None
    """A system turn put first in every conversation that has none; null: none."""
    train_on: str = field(default="all_assistant", metadata={"choices": ("all_assistant", "last_assistant")})
    """Which assistant turns get loss: every one, or only the last (the others become context)."""
    seq_length: int = 2048
    """Tokens per packed sample (the training seq_length)."""
    overlong: str = field(default="truncate", metadata={"choices": ("truncate", "drop")})
    """A trace longer than seq_length: keep its first seq_length tokens, or drop it (counted)."""
    packing: str = field(default="best_fit", metadata={"choices": ("best_fit", "sequential", "none")})
    """best_fit: longest first into the fullest row that fits (fewest rows); sequential: input order;
    none: one document per row, padded (correct with every attention kernel, no THD or block mask
    needed; the report shows the padding it costs)."""
    answer_filter: str = field(default="none", metadata={"choices": ("none", "auto", "boxed", "gsm8k")})
    """Keep a trace only if its final answer equals the reference: the last \\boxed{...}, the text
    after GSM8K's ####, or auto (boxed, else ####); none: keep all."""
    on_bad_record: str = field(default="skip", metadata={"choices": ("skip", "error")})
    """A bad record (malformed JSON, missing field, bad log-probs, ...): count and skip it, or stop
    with an error naming the file and line."""
    teacher_fill_logprob: float = 0.0
    """Teacher log-prob given to trained tokens the engine did not report: template markup after
    the generated text (ChatML's newline after <|im_end|>), or an end-of-turn token the engine did
    not record. 0.0 (probability 1) is right for markup the template always writes; an unrecorded
    end-of-turn token gets it too (the teacher's real stop probability is lower). Counted in the
    report (teacher_filled_tokens)."""
    cut_off: str = field(default="drop", metadata={"choices": ("drop", "keep")})
    """Responses cut at the engine's token limit (fields.finish_reason is `length`): drop them
    (counted as cut_off), or keep them without the template's end-of-turn markup (the teacher did
    not stop there, so the student must not learn to stop there)."""
    teacher_tokenizer_fingerprint: str | None = None
    """The vocabulary fingerprint of the tokenizer the teacher sampled with (`nemo-dcod generate`
    writes it into its prepare.yaml). When it is this tokenizer's, the teacher's token ids are the
    response as sampled and are used as they are, even where re-tokenizing the text would split it
    otherwise; another fingerprint is an error (the ids would mean other tokens). null: the
    response text is tokenized and the engine's tokens checked against it (teacher_tokens_mismatch
    where they differ)."""
    teacher_tokenizer: str | None = None
    """Instead of teacher_tokenizer_fingerprint: the directory of the tokenizer the teacher sampled
    with (its fingerprint is computed), for a config written before the traces exist."""
    records_per_shard: int = 20000
    """Input records per store shard: the unit of work, of resume and of a worker."""
    workers: int = 1
    """Worker processes (each tokenizes and writes whole shards); 1: in this process."""
    out_dir: str = "data/store"
    """The store. Re-running with the same inputs and config finishes or keeps it."""
    overwrite: bool = False
    """Replace a complete store made from other inputs or another config (otherwise an error)."""

    def problems(self) -> list[str]:
        """Every problem of this config, each naming the field and how to fix it."""
        out = choice_problems(self)
        out.extend(self.fields.problems())
        if not self.inputs:
            out.append("inputs: list at least one trace file, glob pattern or saved dataset.")
        if not self.tokenizer:
            out.append("tokenizer: set the student's Hugging Face tokenizer directory.")
        if self.seq_length < 2:
            out.append(f"seq_length={self.seq_length}: must be >= 2 tokens.")
        if self.records_per_shard < 1:
            out.append(f"records_per_shard={self.records_per_shard}: must be >= 1.")
        if self.workers < 1:
            out.append(f"workers={self.workers}: must be >= 1.")
        if not -math.inf < self.teacher_fill_logprob <= 0:  # NaN fails too
            out.append(f"teacher_fill_logprob={self.teacher_fill_logprob}: must be a finite log-prob (<= 0).")
        if self.teacher_tokenizer_fingerprint is not None and self.teacher_tokenizer is not None:
            out.append(
                "teacher_tokenizer_fingerprint and teacher_tokenizer are both set: name the teacher's "
                "vocabulary one way."
            )
        for name in ("teacher_tokenizer_fingerprint", "teacher_tokenizer"):
            if getattr(self, name) is not None and (
                self.fields.teacher_tokens is None or self.fields.teacher_logprobs is None
            ):
                out.append(
                    f"{name} is set without fields.teacher_tokens and fields.teacher_logprobs: the "
                    f"sampled token ids are what it vouches for; map them, or set {name}=null."
                )
        if self.answer_filter != "none" and self.fields.reference is None:
            out.append(
                f"answer_filter={self.answer_filter} needs fields.reference (the field holding the "
                "reference answer); or set answer_filter=none."
            )
        if self.format == "hf_disk" and any(any(c in p for c in "*?[") for p in self.inputs):
            out.append("inputs: glob patterns are for files; list saved datasets (hf_disk) by directory.")
        return out

    def content_settings(self) -> dict[str, Any]:
        """The settings that change what the store holds (not where or how fast it is written)."""
        from dataclasses import asdict

        settings = asdict(self)
        for name in ("inputs", "workers", "out_dir", "overwrite", "tokenizer"):
            settings.pop(name)
        return settings
