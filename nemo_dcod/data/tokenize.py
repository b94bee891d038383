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

**Teacher log-probs** describe the last assistant turn, as the engine generated it, optionally
followed by the token that stopped it (the template's end-of-turn token, e.g. ``<|im_end|>``),
whose log-prob is the teacher's probability of stopping there.

* *Same tokenizer* (``teacher_tokenizer_fingerprint`` equals this tokenizer's
  :func:`vocabulary_fingerprint`): the engine's ids **are** the response. The document is the
  rendering before the response (tokenized: what the teacher was prompted with), the ids as
  sampled, then the rendering after it (the end-of-turn markup, tokenized). Re-tokenizing the
  decoded text would merge some sampled pieces differently (a model may sample ``"ab"`` as ``a``,
  ``b``): those traces are kept as sampled, which is what the teacher's log-probs describe. The ids
  must decode to the response text (surrounding whitespace ignored), either all of them or all but
  a last one equal to the template's first token after the response: that one is the stop token,
  and its log-prob goes on the template's end-of-turn token.
* *Otherwise*: engine tokens are compared with the re-tokenized text from the start of that turn:
  ids must be equal; strings must equal each token's decoded text (surrounding whitespace ignored,
  since engines and tokenizers disagree on where a space belongs); log-probs alone must count the
  turn's tokens or its content's. A stop token the engine reported lines up with the template's
  end-of-turn token the same way.

A disagreement is ``teacher_tokens_mismatch``. Trained tokens the engine did not report get
``teacher_fill_logprob``, counted (``filled``): template markup after the end-of-turn token
(ChatML's newline), an end-of-turn the engine did not record, earlier turns. The default 0.0
(probability 1) is exact for markup the template always writes, and overstates the teacher's
certainty for an unrecorded stop: which is why ``nemo-dcod generate`` records the stop token's
log-prob. A document whose end-of-turn token got the recorded one counts as ``stop_logprob``.

**Cut-off responses** (``fields.finish_reason`` is ``length``: the engine ran out of tokens) are
skipped as ``cut_off`` by default; with ``cut_off=keep`` the document ends with the response:
no end-of-turn markup is appended, since the teacher did not stop there.
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

__all__ = [
    "Document",
    "TraceTokenizer",
    "check_same_vocabulary",
    "load_tokenizer",
    "teacher_vocabulary",
    "tokenizer_fingerprint",
    "unforeseen",
    "vocabulary_fingerprint",
]

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
        stop_logprob: the end-of-turn token after the response carries the teacher's recorded
            log-prob of stopping (not the fill value).
        cut_off: the engine cut the response at its token limit (kept with ``cut_off=keep``, with
            no end-of-turn markup).
    """

    index: int
    tokens: np.ndarray
    trained: np.ndarray
    teacher_logprobs: np.ndarray | None
    truncated: bool = False
    filled: int = 0
    stop_logprob: bool = False
    cut_off: bool = False


@dataclass(frozen=True)
class _Rendered:
    """A conversation rendered with the chat template."""

    full: str
    spans: list[tuple[int, int]]
    """The trained character spans (one per trained assistant turn)."""
    content: tuple[int, int] | None
    """Where the last trained turn's content lies in ``full`` (without surrounding whitespace
    when the template trims it); None when the template rewrites it."""


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
    tok = _load_fast(path)
    if chat_template is not None:
        tok.chat_template = chat_template
    if not tok.chat_template:
        raise DataError(f"tokenizer={path} has no chat template: set chat_template in the prepare config.")
    return tok


def _load_fast(path: str) -> Any:
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
    return tok


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 of what decides token ids: the tokenizer model, added tokens and the chat template."""
    h = hashlib.sha256()
    h.update(tok.backend_tokenizer.to_str().encode())
    h.update(json.dumps([tok.chat_template, tok.pad_token_id, tok.eos_token_id, tok.bos_token_id]).encode())
    return h.hexdigest()


def vocabulary_fingerprint(tok: Any) -> str:
    """sha256 of the tokenizer's id -> token mapping (added and special tokens included).

    Two tokenizers with the same fingerprint give every id the same token, so ids sampled with one
    are a token sequence of the other, whatever their normalizers or merges would make of the
    decoded text. ``nemo-dcod generate`` records it; ``prepare`` compares it with the student's.
    Works for slow (sentencepiece) and fast tokenizers alike.
    """
    pairs = sorted((int(i), str(t)) for t, i in tok.get_vocab().items())
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def teacher_vocabulary(cfg: PrepareConfig) -> str | None:
    """The vocabulary fingerprint the traces were sampled with: ``teacher_tokenizer_fingerprint``,
    or that of ``teacher_tokenizer``; None when neither is set.

    Raises:
        DataError: ``teacher_tokenizer`` is not a tokenizer directory.
    """
    if cfg.teacher_tokenizer is None:
        return cfg.teacher_tokenizer_fingerprint
    return vocabulary_fingerprint(_load_fast(cfg.teacher_tokenizer))


def check_same_vocabulary(expected: str | None, tok: Any, where: str) -> None:
    """Refuse a tokenizer whose vocabulary is not the one the teacher sampled with.

    Raises:
        DataError: naming both fingerprints and the ways out.
    """
    mine = vocabulary_fingerprint(tok)
    if expected is not None and expected != mine:
        raise DataError(
            f"the traces were sampled with the vocabulary {expected[:16]}... (teacher_tokenizer_fingerprint "
            f"or teacher_tokenizer), tokenizer={where} has another ({mine[:16]}...): their token ids "
            "would mean other tokens. Use the teacher's tokenizer (a student that shares it), or set "
            "teacher_tokenizer_fingerprint=null and teacher_tokenizer=null to re-tokenize the response "
            "text and check the engine's tokens against it (traces whose tokens differ are skipped as "
            "teacher_tokens_mismatch)."
        )


class TraceTokenizer:
    """Turns :class:`Trace` objects into :class:`Document` objects (or the reason they are skipped).

    Args:
        cfg: the prepare config (template, seq_length, policies, filter).
        tokenizer: a loaded tokenizer; None: load ``cfg.tokenizer``.

    Raises:
        DataError: ``cfg.teacher_tokenizer_fingerprint`` is not this tokenizer's.
    """

    def __init__(self, cfg: PrepareConfig, tokenizer: Any = None) -> None:
        self.cfg = cfg
        self.tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer, cfg.chat_template)
        self.has_teacher = cfg.fields.has_teacher()
        self.as_sampled = cfg.teacher_tokenizer_fingerprint is not None or cfg.teacher_tokenizer is not None
        if self.as_sampled:
            check_same_vocabulary(teacher_vocabulary(cfg), self.tok, cfg.tokenizer)
            self.vocab_size = len(self.tok)

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        text: str = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return text

    def _spans(self, trace: Trace) -> _Rendered:
        """The rendered conversation, its trained character spans, and where the last turn's
        content lies in it."""
        loc = trace.location
        msgs = trace.messages
        try:
            full = self._render(msgs, False)
            turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
            if self.cfg.train_on == "last_assistant":
                turns = turns[-1:]
            spans = []
            content = None
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
                text = msgs[i]["content"]
                at = upto.find(text, len(pre))
                if at < 0:  # a template that trims the content (Llama 3's)
                    text = text.strip()
                    at = upto.find(text, len(pre)) if text else -1
                content = (at, at + len(text)) if at >= 0 else None
        except RecordError:
            raise
        except Exception as exc:  # jinja raises TemplateError and whatever the template raises
            raise RecordError("template_error", f"the chat template failed: {exc}", loc) from exc
        return _Rendered(full, spans, content)

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

    def _pieces(self, trace: Trace, rendered: _Rendered) -> list[str]:
        """The texts to tokenize for ``trace``: the whole rendering; or, with the sampled ids
        used as they are, the text before the response and the text after it (none after a
        cut-off response kept: it gets no end-of-turn markup)."""
        needs_content = self.as_sampled or trace.cut_off
        if needs_content and rendered.content is None:
            raise RecordError(
                "template_error",
                "the chat template does not write the response as it is (it rewrites it), so "
                + (
                    "the sampled token ids cannot be placed in the rendering"
                    if self.as_sampled
                    else "where the cut-off response ends cannot be found"
                ),
                trace.location,
            )
        if not self.as_sampled:
            return [rendered.full]
        assert rendered.content is not None
        a, b = rendered.content
        return [rendered.full[:a]] if trace.cut_off else [rendered.full[:a], rendered.full[b:]]

    def encode(self, traces: list[Trace]) -> list[Document | RecordError]:
        """One :class:`Document` or :class:`RecordError` per trace, in order.

        Whatever goes wrong with one trace is that trace's error, never the batch's: an exception
        no check foresaw is its ``unparseable_record`` (see :func:`unforeseen`).
        """
        out: list[Document | RecordError | None] = [None] * len(traces)
        todo: list[tuple[int, _Rendered, list[str]]] = []
        for k, trace in enumerate(traces):
            try:
                if trace.cut_off and self.cfg.cut_off == "drop":
                    out[k] = RecordError(
                        "cut_off",
                        "the response was cut at the engine's token limit (finish reason length); "
                        "cut_off=keep keeps such responses without an end-of-turn",
                        trace.location,
                    )
                    continue
                problem = self._answer_problem(trace)
                if problem is not None:
                    out[k] = problem
                    continue
                rendered = self._spans(trace)
                todo.append((k, rendered, self._pieces(trace, rendered)))
            except RecordError as exc:
                out[k] = exc
            except Exception as exc:  # one hostile record must not end the run
                out[k] = unforeseen(exc, trace.location)
        for b in range(0, len(todo), _BATCH):
            chunk = todo[b : b + _BATCH]
            encoded = iter(self._encode_batch([text for _, _, pieces in chunk for text in pieces]))
            for k, rendered, pieces in chunk:
                encs = [next(encoded) for _ in pieces]
                try:
                    for enc in encs:
                        if isinstance(enc, Exception):
                            raise enc
                    if self.as_sampled:
                        out[k] = self._sampled_document(traces[k], rendered, encs)
                    else:
                        out[k] = self._document(traces[k], encs[0].ids, encs[0].offsets, rendered)
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
        self, trace: Trace, ids: list[int], offsets: list[tuple[int, int]], rendered: _Rendered
    ) -> Document:
        """The document of the re-tokenized rendering (engine tokens checked against it)."""
        tokens = np.asarray(ids, dtype=np.int32)
        starts = np.asarray([o[0] for o in offsets], dtype=np.int64)
        after = len(rendered.full)
        if rendered.content is not None:
            after = rendered.content[1]
            if trace.cut_off:  # kept without the end-of-turn markup the teacher never wrote
                keep = starts < after
                tokens, starts = tokens[keep], starts[keep]
        trained = self._trained(starts, rendered.spans)
        teacher = matched = None
        if self.has_teacher:
            teacher = np.zeros(len(tokens), dtype=np.float32)
            content = rendered.content or rendered.spans[-1]
            matched = self._align_teacher(trace, tokens, starts, rendered.spans[-1], content, teacher)
        return self._finish(trace, tokens, trained, teacher, matched, starts >= after)

    def _sampled_document(self, trace: Trace, rendered: _Rendered, encs: list[Any]) -> Document:
        """The document with the teacher's sampled ids as the last response (see the module
        docstring): the rendering's tokens before it, the ids, the rendering's tokens after it
        (the end-of-turn markup, whose first token takes the recorded stop token's log-prob)."""
        assert trace.teacher is not None and rendered.content is not None
        given, lps = trace.teacher.tokens, trace.teacher.logprobs
        loc = trace.location
        if not given or not isinstance(given[0], int):
            raise RecordError(
                "wrong_type",
                "teacher_tokenizer_fingerprint is set: the teacher's tokens must be token ids (ints)",
                loc,
            )
        ids = [int(t) for t in given]
        if max(ids) >= self.vocab_size:
            raise RecordError(
                "teacher_tokens_mismatch",
                f"teacher token id {max(ids)} is not in the tokenizer's vocabulary of {self.vocab_size}",
                loc,
            )
        a, b = rendered.content
        head, tail = encs[0], (encs[1] if len(encs) > 1 else None)
        tail_ids = list(tail.ids) if tail is not None else []
        response = rendered.full[a:b]
        body, stop = ids, None
        if not self._decodes_to(ids, response):
            if len(ids) > 1 and tail_ids and ids[-1] == tail_ids[0] and self._decodes_to(ids[:-1], response):
                body, stop = ids[:-1], ids[-1]
            else:
                raise RecordError(
                    "teacher_tokens_mismatch",
                    f"the {len(ids)} teacher token ids do not decode to the response (nor do they "
                    "without a last one equal to the template's end-of-turn token "
                    f"{self.tok.convert_ids_to_tokens(tail_ids[0]) if tail_ids else None!r})",
                    loc,
                )
        n_head = len(head.ids)
        tokens = np.asarray([*head.ids, *body, *tail_ids], dtype=np.int32)
        tail_starts = [b + o[0] for o in tail.offsets] if tail is not None else []
        starts = np.asarray([o[0] for o in head.offsets] + [a] * len(body) + tail_starts, dtype=np.int64)
        trained = self._trained(starts, rendered.spans)
        trained[n_head : n_head + len(body)] = True  # the response, whatever its character offsets
        teacher = matched = None
        if self.has_teacher:
            teacher = np.zeros(len(tokens), dtype=np.float32)
            matched = np.zeros(len(tokens), dtype=bool)
            end = n_head + len(body) + (stop is not None)
            teacher[n_head:end] = np.asarray(lps[: end - n_head], dtype=np.float32)
            matched[n_head:end] = True
        after = np.zeros(len(tokens), dtype=bool)
        after[n_head + len(body) :] = True
        return self._finish(trace, tokens, trained, teacher, matched, after)

    def _decodes_to(self, ids: list[int], text: str) -> bool:
        # Surrounding whitespace ignored: engines and templates disagree on where a space belongs.
        decoded: str = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return decoded.strip() == text.strip()

    @staticmethod
    def _trained(starts: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
        trained = np.zeros(len(starts), dtype=bool)
        for a, b in spans:
            trained |= (starts >= a) & (starts < b)
        return trained

    def _finish(
        self,
        trace: Trace,
        tokens: np.ndarray,
        trained: np.ndarray,
        teacher: np.ndarray | None,
        matched: np.ndarray | None,
        after_response: np.ndarray,
    ) -> Document:
        """Fill, truncate and count: the :class:`Document`.

        Args:
            teacher: ``[n]`` the engine's log-probs where ``matched``; None without teacher data.
            matched: ``[n]`` bool, tokens that got an engine log-prob.
            after_response: ``[n]`` bool, tokens after the last response (its end-of-turn markup).
        """
        unmatched = None
        if teacher is not None and matched is not None:
            unmatched = trained & ~matched
            teacher[unmatched] = self.cfg.teacher_fill_logprob
        truncated = False
        if len(tokens) > self.cfg.seq_length:
            if self.cfg.overlong == "drop":
                raise RecordError(
                    "too_long", f"{len(tokens)} tokens > seq_length={self.cfg.seq_length}", trace.location
                )
            s = self.cfg.seq_length
            tokens, trained, after_response, truncated = tokens[:s], trained[:s], after_response[:s], True
            if teacher is not None and matched is not None and unmatched is not None:
                teacher, matched, unmatched = teacher[:s], matched[:s], unmatched[:s]
        filled = stop = 0
        if unmatched is not None and matched is not None:
            filled = int(unmatched[1:].sum())  # token 0 is never a label
            stop = int((trained & matched & after_response)[1:].any())
        # The first token of a document is never a label (nothing before it in the document).
        if not trained[1:].any():
            raise RecordError("no_trainable_tokens", "no assistant token within seq_length", trace.location)
        return Document(trace.index, tokens, trained, teacher, truncated, filled, bool(stop), trace.cut_off)

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
