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
tokenizer (an instruct model's end-of-turn token is one); ``finish_reason`` is ``stop`` then, and
``length`` when ``max_new_tokens`` ran out first.
"""

from __future__ import annotations

import gc
import importlib.util
import time
from collections.abc import Sequence
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
    """stop: an end-of-sequence token; length: max_new_tokens reached."""


class Generator(Protocol):
    """A back end: token-id prompts in, ``num_samples`` completions per prompt out."""

    name: str

    def generate(
        self, prompt_ids: Sequence[list[int]], params: SamplingParams, desc: str = ""
    ) -> list[list[Completion]]: ...

    def close(self) -> None: ...


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
        self, prompt_ids: Sequence[list[int]], params: SamplingParams, desc: str = ""
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
        stop = set(self.stop_ids)
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
            with torch.no_grad():
                generated = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    generation_config=config,
                )
            for row, (i, j) in enumerate(batch):
                tokens = generated[row, width:].tolist()
                end = next((t for t, tok in enumerate(tokens) if tok in stop), None)
                kept = tokens if end is None else tokens[:end]
                text = self.tokenizer.decode(kept, skip_special_tokens=True)
                out[i][j] = Completion(text, len(kept), "length" if end is None else "stop")
            bar.update(len(batch))
        bar.close()
        return [[c for c in row if c is not None] for row in out]

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
    ) -> None:
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            tokenizer=tokenizer_path,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            trust_remote_code=trust_remote_code,
        )
        self.stop_ids = list(stop_ids)
        self.progress = progress

    def generate(
        self, prompt_ids: Sequence[list[int]], params: SamplingParams, desc: str = ""
    ) -> list[list[Completion]]:
        """``params.num_samples`` completions for each prompt, in prompt order."""
        from vllm import SamplingParams as VLLMSamplingParams

        sampling = VLLMSamplingParams(
            n=params.num_samples,
            temperature=params.temperature,
            top_p=params.top_p if not params.greedy else 1.0,
            max_tokens=params.max_new_tokens,
            seed=params.seed,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=True,
        )
        started = time.perf_counter()
        requests: Any = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(requests, sampling, use_tqdm=self.progress)
        if self.progress and desc:
            print(f"{desc}: {len(prompt_ids)} prompts in {time.perf_counter() - started:.1f} s")
        result: list[list[Completion]] = []
        for request in outputs:
            row = []
            for o in request.outputs:
                ids = list(o.token_ids)
                if ids and ids[-1] in self.stop_ids:
                    ids = ids[:-1]
                row.append(Completion(o.text, len(ids), "stop" if o.finish_reason == "stop" else "length"))
            result.append(row)
        return result

    def close(self) -> None:
        import torch

        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
