"""Prompts -> completions: batched generation with transformers, or vLLM when installed.

Both back ends take prompts as token ids, tokenized once here (:func:`encode_prompts`), so the two
see exactly the same input (vLLM, given text, would add a second BOS after a chat template's).

transformers: sequences are sorted longest prompt first (a batch out of memory fails at once, and
similar lengths waste less padding), left-padded (a decoder continues from the last position of
every row), and generated ``batch_size`` at a time; avg@k repeats each prompt k times. Sampling is
plain temperature + top-p (``top_k=0``: transformers' default top-k of 50 would otherwise apply
silently and differ from vLLM). Greedy is ``temperature=0``. The checkpoint's own
``generation_config.json`` only contributes its end-of-sequence ids: every sampling setting comes
from the eval config.

A completion stops at any end-of-sequence id of the checkpoint's generation config or of its
tokenizer (an instruct model's end-of-turn token is one), or once its text contains one of the
sampling's ``stop`` strings (kept in the text, with the rest of the token that completed it);
``finish_reason`` is ``stop`` then, and ``length`` when ``max_new_tokens`` ran out first.

**Sampled-token log-probs** (``SamplingParams.logprobs``, what ``nemo-dcod generate`` records):
the log-probability of each generated token under the model's *untempered* distribution,
``log_softmax(raw logits)[token]``, whatever temperature and top-p drew it, in fp32.
transformers: a logits processor placed before the sampling warpers (temperature, top-p: those
come after every user processor) keeps each step's ``log_softmax`` of the raw fp32 logits, one
``[B, V]`` buffer, and gathers it at the token sampled from it on the next step. The checkpoint's
``generation_config.json`` is not merged into the sampling settings (``use_model_defaults=False``),
so no penalty or warper of its own reaches the logits first. Output columns past the tokenizer's
vocabulary (a padded embedding, as NeMo exports it) are masked there: never sampled, and the
log-softmax is over the tokenizer's vocabulary, as the student's log-probs are in training.
vLLM: ``SamplingParams(logprobs=0)`` (the sampled token's only) from an engine built with
``logprobs_mode="raw_logprobs"`` (over the model's full output: checkpoints with padded columns
are for the transformers back end). Both back ends also record the log-prob of the token that
stopped a completion (``Completion.stop_logprob``): the teacher's probability of ending its turn.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

__all__ = [
    "Completion",
    "Generator",
    "SamplingParams",
    "TransformersGenerator",
    "VLLMGenerator",
    "encode_prompts",
    "finish_completion",
    "load_tokenizer",
    "resolve_backend",
    "stop_token_ids",
    "vllm_available",
]


@dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn: greedy when ``temperature == 0``."""

    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1
    max_new_tokens: int = 1024
    seed: int = 0
    stop: tuple[str, ...] = ()
    """Strings that end a completion (kept in it); empty: end-of-sequence ids only."""
    logprobs: bool = False
    """Record each generated token's log-prob under the untempered distribution."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Completion:
    """One generated continuation."""

    text: str
    """Decoded without special tokens (the end-of-sequence token is not part of it)."""
    num_tokens: int
    """Generated tokens, the end-of-sequence token not counted."""
    finish_reason: Literal["stop", "length"]
    """stop: an end-of-sequence token or a stop string; length: max_new_tokens reached."""
    token_ids: tuple[int, ...] = ()
    """The generated tokens, the end-of-sequence token not included (``num_tokens`` of them)."""
    logprobs: tuple[float, ...] | None = None
    """Per ``token_ids`` entry, log p(token) under the untempered distribution (with
    ``SamplingParams.logprobs``; else None)."""
    stop_token_id: int | None = None
    """The end-of-sequence id that ended the completion; None for a stop string or the length."""
    stop_logprob: float | None = None
    """That id's log-prob (with ``SamplingParams.logprobs``)."""


BatchCallback = Callable[[int, int], None]
"""Called after each generated batch with (sequences, generated tokens) of that batch."""


class Generator(Protocol):
    """A back end: token-id prompts in, ``num_samples`` completions per prompt out."""

    name: str

    def generate(
        self,
        prompt_ids: Sequence[list[int]],
        params: SamplingParams,
        desc: str = "",
        on_batch: BatchCallback | None = None,
    ) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def _first_stop_string(tokens: Sequence[int], stop: Sequence[str], decode: Callable[[list[int]], str]) -> int:
    """The number of leading tokens whose text first contains a stop string, or -1 if none does.

    A binary search over prefixes (their texts only grow), so O(log n) decodes, not n.
    """
    if not stop or not any(s in decode(list(tokens)) for s in stop):
        return -1
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in decode(list(tokens[:mid])) for s in stop):
            hi = mid
        else:
            lo = mid + 1
    return lo


def finish_completion(
    tokens: Sequence[int],
    logprobs: Sequence[float] | None,
    stop_ids: Sequence[int],
    stop: Sequence[str],
    decode: Callable[[list[int]], str],
    text_decode: Callable[[list[int]], str] | None = None,
) -> Completion:
    """A :class:`Completion` from a row of generated tokens: cut at the first end-of-sequence id or
    stop string (whichever ends first), else the whole row (``length``).

    Args:
        tokens: the generated ids (after a batch's end, a finished row carries padding).
        logprobs: their log-probs, or None.
        stop_ids: end-of-sequence ids.
        stop: stop strings.
        decode: ids -> text as the stop strings are matched (special tokens kept).
        text_decode: ids -> the completion's ``text``; default ``decode``.
    """
    stops = set(stop_ids)
    eos = next((t for t, tok in enumerate(tokens) if tok in stops), None)
    head = list(tokens if eos is None else tokens[:eos])
    cut = _first_stop_string(head, stop, decode)
    if cut >= 0:
        kept, reason, stop_id, stop_lp = head[:cut], "stop", None, None
    elif eos is not None:
        kept, reason, stop_id = head, "stop", int(tokens[eos])
        stop_lp = None if logprobs is None else float(logprobs[eos])
    else:
        kept, reason, stop_id, stop_lp = head, "length", None, None
    text = (text_decode or decode)(kept)
    lps = None if logprobs is None else tuple(float(x) for x in logprobs[: len(kept)])
    finish: Literal["stop", "length"] = "stop" if reason == "stop" else "length"
    return Completion(text, len(kept), finish, tuple(int(t) for t in kept), lps, stop_id, stop_lp)


def _stop_string_criterion(stop: Sequence[str], width: int, decode: Callable[[list[int]], str]) -> Any:
    """A transformers ``StoppingCriteria``: a row is done once the text of its last generated tokens
    holds a stop string.

    transformers' own ``stop_strings`` needs a tokenizer whose vocabulary it can clean (it fails on
    word-level ones); this decodes a window of the row's newest tokens instead, as many as the
    longest stop string has characters (+2), which covers it whenever each token writes a
    character. :func:`finish_completion` then cuts the row at the same place.
    """
    import torch
    from transformers import StoppingCriteria

    window = max(len(s) for s in stop) + 2

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            tails = input_ids[:, width:][:, -window:].tolist()
            done = [any(s in decode(tail) for s in stop) for tail in tails]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopStrings()


def _first_logits_processor(record: bool, vocab: int | None) -> Any:
    """A transformers ``LogitsProcessor`` that sees the raw logits first: it masks the padded
    columns past the tokenizer's ``vocab`` (ids with no token, which a checkpoint exported with a
    padded embedding would otherwise sample) and, with ``record``, keeps log p(sampled token).

    Called once per step with the step's raw fp32 logits ``[B, V]`` (it must come before every
    processor that changes them); keeps their ``log_softmax`` (over the real vocabulary) and, on
    the next call, gathers it at the token that was drawn (the last column of ``input_ids``).
    :meth:`finish` adds the last step's and returns ``[B, T]``.
    """
    import torch
    from transformers import LogitsProcessor

    class FirstProcessor(LogitsProcessor):
        def __init__(self) -> None:
            self.last: torch.Tensor | None = None
            self.values: list[torch.Tensor] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if vocab is not None and scores.shape[-1] > vocab:
                scores = scores.clone()
                scores[:, vocab:] = -float("inf")
            if record:
                if self.last is not None:
                    self.values.append(self.last.gather(1, input_ids[:, -1:]))
                self.last = torch.log_softmax(scores.float(), dim=-1)
            return scores

        def finish(self, generated: torch.Tensor) -> torch.Tensor:
            """``[B, T]`` log-probs of ``generated`` ``[B, T]`` (the new tokens only)."""
            if self.last is not None and generated.shape[1] > len(self.values):
                self.values.append(self.last.gather(1, generated[:, -1:].to(self.last.device)))
            if not self.values:
                return torch.zeros(generated.shape, dtype=torch.float32)
            return torch.cat(self.values, dim=1).float().cpu()

    return FirstProcessor()


def vllm_available() -> bool:
    """Whether the ``vllm`` package can be imported."""
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str, device: str) -> Literal["transformers", "vllm"]:
    """auto -> vllm when it is installed and a GPU is there, else transformers.

    Raises:
        ImportError: backend=vllm without vLLM installed.
    """
    if backend == "vllm":
        if not vllm_available():
            raise ImportError(
                "backend=vllm: vLLM is not installed (pip install vllm); or set backend=transformers."
            )
        return "vllm"
    if backend == "transformers":
        return "transformers"
    import torch

    use_gpu = device != "cpu" and torch.cuda.is_available()
    return "vllm" if use_gpu and vllm_available() else "transformers"


def load_tokenizer(path: str, chat_template: str | None = None) -> Any:
    """The checkpoint's tokenizer, left-padding, with a pad token (its EOS when it has none).

    Args:
        path: a directory with the tokenizer files (or a hub name).
        chat_template: a Jinja template, or the path of a file holding one, replacing the
            tokenizer's own; None keeps the tokenizer's.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        candidate = Path(chat_template)
        is_file = "{" not in chat_template and candidate.is_file()
        tokenizer.chat_template = candidate.read_text() if is_file else chat_template
    return tokenizer


def encode_prompts(
    tokenizer: Any,
    user_messages: Sequence[str],
    use_chat_template: bool = True,
    system_prompt: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[str], list[list[int]]]:
    """The prompt texts and their token ids.

    With the chat template: ``[system?, user]`` rendered with the generation prompt, tokenized
    without adding special tokens (the template writes them). Without: the message as it is, with
    the tokenizer's special tokens (BOS).

    Raises:
        ValueError: use_chat_template without any chat template.
    """
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "use_chat_template=true but the tokenizer has no chat template: set chat_template (a Jinja "
            "template or a file holding one), or use_chat_template=false for a base model."
        )
    texts: list[str] = []
    for message in user_messages:
        if use_chat_template:
            turns = [{"role": "system", "content": system_prompt}] if system_prompt else []
            turns.append({"role": "user", "content": message})
            text = tokenizer.apply_chat_template(
                turns, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
            )
        else:
            text = f"{system_prompt}\n\n{message}" if system_prompt else message
        texts.append(text)
    encoded = tokenizer(texts, add_special_tokens=not use_chat_template)["input_ids"]
    return texts, [list(ids) for ids in encoded]


def stop_token_ids(model_path: str, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: the checkpoint's ``generation_config.json`` ones and the tokenizer's."""
    ids: list[int] = []
    config_file = Path(model_path) / "generation_config.json"
    if config_file.is_file():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        ids.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


def _torch_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        # On CPU, bf16/fp16 matmuls are slow or missing: compute in fp32. On GPU: the checkpoint's.
        return torch.float32 if device == "cpu" else "auto"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


class TransformersGenerator:
    """Batched generation with ``AutoModelForCausalLM.generate`` (see the module docstring)."""

    name = "transformers"

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        stop_ids: Sequence[int],
        batch_size: int = 16,
        dtype: str = "auto",
        device: str = "auto",
        progress: bool = True,
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=_torch_dtype(dtype, device), trust_remote_code=trust_remote_code
        )
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.stop_ids = list(stop_ids)
        self.batch_size = batch_size
        self.progress = progress
        # Sampling settings come from SamplingParams alone: transformers >= 4.50 would otherwise
        # take any setting left at its default from the checkpoint's generation_config.json.
        # A checkpoint whose embedding is padded past the tokenizer (NeMo pads to a multiple of 128)
        # has output columns no token stands for: they are never sampled, and log-probs are over
        # the tokenizer's vocabulary, as the student's are in training.
        columns, vocab = int(self.model.config.vocab_size), len(tokenizer)
        self.vocab_limit: int | None = vocab if columns > vocab else None
        accepted = inspect.signature(self.model.generate).parameters
        self._no_model_defaults = {"use_model_defaults": False} if "use_model_defaults" in accepted else {}

    def _generation_config(self, params: SamplingParams) -> Any:
        from transformers import GenerationConfig

        sampling: dict[str, Any] = {"do_sample": False}
        if not params.greedy:
            sampling = {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": 0,
            }
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            bos_token_id=self.model.generation_config.bos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_ids or None,
            **sampling,
        )

    def generate(
        self,
        prompt_ids: Sequence[list[int]],
        params: SamplingParams,
        desc: str = "",
        on_batch: BatchCallback | None = None,
    ) -> list[list[Completion]]:
        """``params.num_samples`` completions for each prompt, in prompt order."""
        import torch
        from tqdm.auto import tqdm

        torch.manual_seed(params.seed)
        config = self._generation_config(params)
        jobs = [(i, j) for i in range(len(prompt_ids)) for j in range(params.num_samples)]
        jobs.sort(key=lambda job: -len(prompt_ids[job[0]]))
        out: list[list[Completion | None]] = [[None] * params.num_samples for _ in prompt_ids]
        pad = self.tokenizer.pad_token_id
        bar = tqdm(total=len(jobs), desc=desc, unit="seq", disable=not self.progress)
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            width = max(len(prompt_ids[i]) for i, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (i, _) in enumerate(batch):
                ids = prompt_ids[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            first = None
            if params.logprobs or self.vocab_limit is not None:
                first = _first_logits_processor(params.logprobs, self.vocab_limit)
            with torch.no_grad():
                generated = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    generation_config=config,
                    logits_processor=[first] if first is not None else None,
                    stopping_criteria=[_stop_string_criterion(params.stop, width, self._decode_all)]
                    if params.stop
                    else None,
                    **self._no_model_defaults,
                )
            new_tokens = generated[:, width:]
            logprobs = first.finish(new_tokens).tolist() if first is not None and params.logprobs else None
            rows = new_tokens.tolist()
            tokens_out = 0
            for row, (i, j) in enumerate(batch):
                completion = finish_completion(
                    rows[row],
                    None if logprobs is None else logprobs[row],
                    self.stop_ids,
                    params.stop,
                    self._decode_all,
                    self._decode_text,
                )
                tokens_out += completion.num_tokens
                out[i][j] = completion
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(len(batch), tokens_out)
        bar.close()
        return [[c for c in row if c is not None] for row in out]

    def _decode_all(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text

    def _decode_text(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def close(self) -> None:
        import torch

        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class VLLMGenerator:
    """Generation with vLLM (GPU): continuous batching, tensor parallel over ``tensor_parallel_size``."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        tokenizer_path: str,
        stop_ids: Sequence[int],
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        progress: bool = True,
        trust_remote_code: bool = False,
        raw_logprobs: bool = False,
    ) -> None:
        from vllm import LLM

        # Sampled-token log-probs from the raw logits (before temperature / top-p), not the
        # processed distribution they were drawn from; an engine-wide setting (vLLM >= 0.10.2).
        extra: dict[str, Any] = {"logprobs_mode": "raw_logprobs"} if raw_logprobs else {}
        try:
            self.llm = LLM(
                model=model_path,
                tokenizer=tokenizer_path,
                dtype=dtype,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                seed=seed,
                trust_remote_code=trust_remote_code,
                **extra,
            )
        except TypeError as exc:
            if raw_logprobs and "logprobs_mode" in str(exc):
                raise ImportError(
                    "this vLLM has no logprobs_mode (raw log-probs of the untempered distribution): "
                    "install vllm>=0.10.2."
                ) from exc
            raise
        self.tokenizer = self.llm.get_tokenizer()
        self.stop_ids = list(stop_ids)
        self.progress = progress

    def generate(
        self,
        prompt_ids: Sequence[list[int]],
        params: SamplingParams,
        desc: str = "",
        on_batch: BatchCallback | None = None,
    ) -> list[list[Completion]]:
        """``params.num_samples`` completions for each prompt, in prompt order."""
        from vllm import SamplingParams as VLLMSamplingParams

        from nemo_dcod.eval.vllm_outputs import completion_from_vllm

        sampling = VLLMSamplingParams(
            n=params.num_samples,
            temperature=params.temperature,
            top_p=params.top_p if not params.greedy else 1.0,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            stop_token_ids=self.stop_ids,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            logprobs=0 if params.logprobs else None,  # 0: the sampled token's only
            skip_special_tokens=True,
        )
        started = time.perf_counter()
        requests: Any = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(requests, sampling, use_tqdm=self.progress)
        if self.progress and desc:
            print(f"{desc}: {len(prompt_ids)} prompts in {time.perf_counter() - started:.1f} s")
        result: list[list[Completion]] = []
        tokens_out = 0
        for request in outputs:
            row = []
            for o in request.outputs:
                completion = completion_from_vllm(
                    o, params, self.stop_ids, self._decode_all, self._decode_text
                )
                tokens_out += completion.num_tokens
                row.append(completion)
            result.append(row)
        if on_batch is not None:
            on_batch(sum(len(r) for r in result), tokens_out)
        return result

    def _decode_all(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text

    def _decode_text(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def close(self) -> None:
        import torch

        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
