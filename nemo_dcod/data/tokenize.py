"""Traces -> token documents: the student's chat template, the assistant-only loss mask, teacher
log-probs aligned to the tokens, the length policy and the correctness filter.

**Which tokens are trained.** The conversation is rendered once with the chat template and
tokenized once (so that no merge differs from how the model will see it). An assistant turn ``i``
occupies the characters between ``render(turns[:i], add_generation_prompt=True)`` and
``render(turns[:i+1])``: what the template emits after the generation prompt, i.e. the content
and the end-of-turn markup, which the student must learn to emit. A token is trained when its
first character lies in such a span. This needs a *prefix-stable* template (each shorter
rendering a prefix of the longer); one that rewrites earlier turns (Qwen3 drops the reasoning of
past turns) is reported as ``template_error`` for the turns it rewrites; ``train_on=last_assistant``
trains only the final turn, which every common template renders stably.

**Teacher log-probs** describe the last assistant turn, as the engine generated it. Engine tokens
are compared with the re-tokenized text from the start of that turn: ids must be equal; strings
must equal each token's decoded text (surrounding whitespace ignored, since engines and
tokenizers disagree on where a space belongs); log-probs alone must count the turn's tokens or
its content's. A disagreement is ``teacher_tokens_mismatch``. Trained tokens the engine did not
report (an end-of-turn marker it stripped, earlier turns) get ``teacher_fill_logprob``, counted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from nemo_dcod.data.answers import answers_match, extract_answer
from nemo_dcod.data.config import PrepareConfig
from nemo_dcod.data.readers import DataError, RecordError, Trace

__all__ = ["Document", "TraceTokenizer", "load_tokenizer", "tokenizer_fingerprint", "unforeseen"]

_BATCH = 512  # texts per call of the (Rust, multi-threaded) tokenizer


@dataclass
class Document:
    """One tokenized trace.

    Attributes:
        index: the record's line or row in its input.
        tokens: ``[n]`` int32 token ids, ``n <= seq_length``.
        trained: ``[n]`` bool, True on assistant tokens (the loss is on predicting these).
        teacher_logprobs: ``[n]`` float32 teacher log p of each token (0 where not trained); None
            when the records carry no teacher log-probs.
        truncated: the trace was cut to ``seq_length``.
        filled: trained tokens whose teacher log-prob is ``teacher_fill_logprob``.
    """

    index: int
    tokens: np.ndarray
    trained: np.ndarray
    teacher_logprobs: np.ndarray | None
    truncated: bool = False
    filled: int = 0


def unforeseen(exc: Exception, location: str) -> RecordError:
    """The ``unparseable_record`` error of a record on which something raised ``exc`` that no check
    foresaw (a hostile value deep in it): counted and named like every bad record."""
    text = f"{type(exc).__name__}: {exc}"
    return RecordError("unparseable_record", text if len(text) <= 200 else text[:197] + "...", location)


def load_tokenizer(path: str, chat_template: str | None = None) -> Any:
    """The student's fast Hugging Face tokenizer, with a chat template.

    Raises:
        DataError: not a tokenizer directory, not a fast tokenizer, or no chat template.
    """
    # The generic fast class reads tokenizer.json and tokenizer_config.json as every model-specific
    # fast class does, without AutoTokenizer's import of every model (seconds per worker process).
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise DataError(
            f"tokenizer={path}: no tokenizer.json there; a fast Hugging Face tokenizer directory is "
            "needed (token offsets come from it). Save one with AutoTokenizer.save_pretrained."
        )
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for a bad directory
        raise DataError(f"tokenizer={path}: cannot load a Hugging Face tokenizer: {exc}") from exc
    if chat_template is not None:
        tok.chat_template = chat_template
    if not tok.chat_template:
        raise DataError(f"tokenizer={path} has no chat template: set chat_template in the prepare config.")
    return tok


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 of what decides token ids: the tokenizer model, added tokens and the chat template."""
    h = hashlib.sha256()
    h.update(tok.backend_tokenizer.to_str().encode())
    h.update(json.dumps([tok.chat_template, tok.pad_token_id, tok.eos_token_id, tok.bos_token_id]).encode())
    return h.hexdigest()


class TraceTokenizer:
    """Turns :class:`Trace` objects into :class:`Document` objects (or the reason they are skipped).

    Args:
        cfg: the prepare config (template, seq_length, policies, filter).
        tokenizer: a loaded tokenizer; None: load ``cfg.tokenizer``.
    """

    def __init__(self, cfg: PrepareConfig, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer, cfg.chat_template)
        self.has_teacher = cfg.fields.has_teacher()

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        text: str = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return text

    def _spans(self, trace: Trace) -> tuple[str, list[tuple[int, int]], tuple[int, int]]:
        """The rendered text, the trained character spans, and the last turn's content span."""
        loc = trace.location
        msgs = trace.messages
        try:
            full = self._render(msgs, False)
            turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            if self.cfg.train_on == "last_assistant":
                turns = turns[-1:]
            spans = []
            content = (0, 0)
            for i in turns:
                pre = self._render(msgs[:i], True)
                # The last turn's render is the full text (one jinja render less per trace).
                upto = full if i == len(msgs) - 1 else self._render(msgs[: i + 1], False)
                if not (upto.startswith(pre) and full.startswith(upto)):
                    raise RecordError(
                        "template_error",
                        f"the chat template renders turn {i} differently once later turns follow "
                        "(not prefix-stable); set train_on=last_assistant",
                        loc,
                    )
                spans.append((len(pre), len(upto)))
                at = upto.find(msgs[i]["content"], len(pre))
                content = (at, at + len(msgs[i]["content"])) if at >= 0 else (len(pre), len(upto))
        except RecordError:
            raise
        except Exception as exc:  # jinja raises TemplateError and whatever the template raises
            raise RecordError("template_error", f"the chat template failed: {exc}", loc) from exc
        return full, spans, content

    def _answer_problem(self, trace: Trace) -> RecordError | None:
        mode = self.cfg.answer_filter
        if mode == "none":
            return None
        response = [m for m in trace.messages if m["role"] == "assistant"][-1]["content"]
        predicted = extract_answer(response, mode)
        if predicted is None:
            return RecordError("no_answer", f"no final answer ({mode}) in the response", trace.location)
        ref = trace.reference or ""
        expected = extract_answer(ref, "auto")
        expected = ref if expected is None else expected
        if not answers_match(predicted, expected):
            return RecordError(
                "wrong_answer", f"answer {predicted!r} != reference {expected!r}", trace.location
            )
        return None

    def encode(self, traces: list[Trace]) -> list[Document | RecordError]:
        """One :class:`Document` or :class:`RecordError` per trace, in order.

        Whatever goes wrong with one trace is that trace's error, never the batch's: an exception
        no check foresaw is its ``unparseable_record`` (see :func:`unforeseen`).
        """
        out: list[Document | RecordError | None] = [None] * len(traces)
        todo: list[tuple[int, str, list[tuple[int, int]], tuple[int, int]]] = []
        for k, trace in enumerate(traces):
            try:
                problem = self._answer_problem(trace)
                if problem is not None:
                    out[k] = problem
                    continue
                todo.append((k, *self._spans(trace)))
            except RecordError as exc:
                out[k] = exc
            except Exception as exc:  # one hostile record must not end the run
                out[k] = unforeseen(exc, trace.location)
        for b in range(0, len(todo), _BATCH):
            chunk = todo[b : b + _BATCH]
            for (k, _, spans, content), enc in zip(
                chunk, self._encode_batch([t[1] for t in chunk]), strict=True
            ):
                try:
                    if isinstance(enc, Exception):
                        raise enc
                    out[k] = self._document(traces[k], enc.ids, enc.offsets, spans, content)
                except RecordError as exc:
                    out[k] = exc
                except Exception as exc:
                    out[k] = unforeseen(exc, traces[k].location)
        assert all(d is not None for d in out)
        return out  # type: ignore[return-value]

    def _encode_batch(self, texts: list[str]) -> list[Any]:
        """The Rust tokenizer's encodings of ``texts``; where the batch call fails, each text alone
        (an exception in place of the one that fails)."""
        # The Rust tokenizer directly: the same ids and offsets as the transformers wrapper
        # (special tokens in the rendered text are matched; none are added), without its
        # per-sequence Python conversion.
        backend = self.tok.backend_tokenizer
        try:
            return list(backend.encode_batch(texts, add_special_tokens=False))
        except Exception:  # find the text that fails
            out: list[Any] = []
            for text in texts:
                try:
                    out.append(backend.encode(text, add_special_tokens=False))
                except Exception as exc:
                    out.append(exc)
            return out

    def _document(
        self,
        trace: Trace,
        ids: list[int],
        offsets: list[tuple[int, int]],
        spans: list[tuple[int, int]],
        content: tuple[int, int],
    ) -> Document:
        tokens = np.asarray(ids, dtype=np.int32)
        starts = np.asarray([o[0] for o in offsets], dtype=np.int64)
        trained = np.zeros(len(tokens), dtype=bool)
        for a, b in spans:
            trained |= (starts >= a) & (starts < b)
        teacher = None
        filled = 0
        if self.has_teacher:
            teacher = np.zeros(len(tokens), dtype=np.float32)
            unmatched = trained & ~self._align_teacher(trace, tokens, starts, spans[-1], content, teacher)
            teacher[unmatched] = self.cfg.teacher_fill_logprob
        truncated = False
        if len(tokens) > self.cfg.seq_length:
            if self.cfg.overlong == "drop":
                raise RecordError(
                    "too_long", f"{len(tokens)} tokens > seq_length={self.cfg.seq_length}", trace.location
                )
            s = self.cfg.seq_length
            tokens, trained, truncated = tokens[:s], trained[:s], True
            if teacher is not None:
                teacher, unmatched = teacher[:s], unmatched[:s]
        if teacher is not None:
            filled = int(unmatched[1:].sum())  # token 0 is never a label
        # The first token of a document is never a label (nothing before it in the document).
        if not trained[1:].any():
            raise RecordError("no_trainable_tokens", "no assistant token within seq_length", trace.location)
        return Document(trace.index, tokens, trained, teacher, truncated, filled)

    def _align_teacher(
        self,
        trace: Trace,
        tokens: np.ndarray,
        starts: np.ndarray,
        span: tuple[int, int],
        content: tuple[int, int],
        teacher: np.ndarray,
    ) -> np.ndarray:
        """Write the engine's log-probs into ``teacher``; return which tokens got one."""
        assert trace.teacher is not None
        given, lps = trace.teacher.tokens, trace.teacher.logprobs
        region = np.flatnonzero((starts >= span[0]) & (starts < span[1]))
        matched = np.zeros(len(tokens), dtype=bool)
        if given is None:
            inner = np.flatnonzero((starts >= content[0]) & (starts < content[1]))
            target = region if len(lps) == len(region) else inner if len(lps) == len(inner) else None
            if target is None:
                raise RecordError(
                    "logprob_length_mismatch",
                    f"{len(lps)} teacher log-probs, but the response has {len(inner)} tokens "
                    f"({len(region)} with the template's end-of-turn markup)",
                    trace.location,
                )
        else:
            target = region[: len(given)]
            ours = tokens[target]
            if len(given) > len(region):
                bad = len(region)
            elif isinstance(given[0], int):
                diff = np.flatnonzero(ours != np.asarray(given))
                bad = int(diff[0]) if len(diff) else -1
            else:
                decoded = [self.tok.decode([int(t)]) for t in ours]
                bad = next(
                    (
                        i
                        for i, (g, d) in enumerate(zip(given, decoded, strict=True))
                        if str(g).strip() != d.strip()
                    ),
                    -1,
                )
            if bad >= 0:
                mine = self.tok.convert_ids_to_tokens(int(tokens[target[bad]])) if bad < len(target) else None
                raise RecordError(
                    "teacher_tokens_mismatch",
                    f"engine token {bad} is {given[bad]!r}, the re-tokenized text has {mine!r} "
                    f"({len(given)} engine tokens, {len(region)} in the turn)",
                    trace.location,
                )
        teacher[target] = np.asarray(lps, dtype=np.float32)
        matched[target] = True
        return matched
