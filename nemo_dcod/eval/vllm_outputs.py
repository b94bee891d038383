"""vLLM's outputs -> :class:`~nemo_dcod.eval.generation.Completion` (kept apart from the generators
so that it is importable, and testable, where vLLM is not installed).

vLLM's ``CompletionOutput`` holds ``token_ids`` and, with ``SamplingParams(logprobs=0)``, per
generated token a dict id -> ``Logprob`` that holds at least the sampled id. A request that stopped
at an end-of-sequence id of the model or one of ``stop_token_ids`` keeps that token as the last of
``token_ids``, with its log-prob: :func:`~nemo_dcod.eval.generation.finish_completion` moves it to
``stop_token_id`` / ``stop_logprob``, as for the transformers back end, so ``nemo-dcod generate``
records the teacher's log-prob of stopping from either back end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from nemo_dcod.eval.generation import Completion, SamplingParams, finish_completion

__all__ = ["completion_from_vllm"]


def completion_from_vllm(
    output: Any,
    params: SamplingParams,
    stop_ids: Sequence[int],
    decode: Callable[[list[int]], str],
    text_decode: Callable[[list[int]], str] | None = None,
) -> Completion:
    """A :class:`Completion` from one of vLLM's ``CompletionOutput`` (see the module docstring).

    Raises:
        RuntimeError: log-probs were asked for and vLLM returned none, or none for a sampled id.
    """
    ids = [int(t) for t in output.token_ids]
    lps = None
    if params.logprobs:
        steps = output.logprobs
        if steps is None or len(steps) != len(ids):
            raise RuntimeError(
                f"vLLM returned {'no' if steps is None else len(steps)} log-prob entries for "
                f"{len(ids)} generated tokens although SamplingParams(logprobs=0) asked for them"
            )
        lps = []
        for t, (step, token) in enumerate(zip(steps, ids, strict=True)):
            if token not in step:
                raise RuntimeError(f"vLLM's log-probs of generated token {t} lack its sampled id {token}")
            lps.append(float(step[token].logprob))
    return finish_completion(ids, lps, stop_ids, params.stop, decode, text_decode)
