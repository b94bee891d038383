"""The teacher's log-probs that ``generate`` records, against a separate transformers forward.

A tiny random Llama (made here, vocabulary of 32 so that it ends a trace with ``</s>`` often
enough) generates batched, left-padded traces through eval's generator with sampling at several
temperatures / top-p; every recorded log-prob must equal ``log_softmax`` of the raw logits of one
forward over prompt + response (no padding, no cache) at the sampled token, to 1e-4 in fp32: the
untempered distribution, whatever drew the token. Also: the same seed gives the same traces, and
greedy decoding (temperature 0) gives what ``model.generate`` gives for each prompt alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nemo_dcod.eval.generation import (
    SamplingParams,
    TransformersGenerator,
    finish_completion,
    load_tokenizer,
    stop_token_ids,
)

PROMPTS = [[1, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18, 19], [1, 20], [1, 5, 6, 7, 8]]  # ids < 24


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.hf_tiny import make_hf_checkpoint

    return make_hf_checkpoint(tmp_path_factory.mktemp("teacher") / "hf", "llama", seed=3, vocab_size=32)


@pytest.fixture(scope="module")
def generator(teacher: Path) -> TransformersGenerator:
    tokenizer = load_tokenizer(str(teacher))
    stops = stop_token_ids(str(teacher), tokenizer)
    return TransformersGenerator(str(teacher), tokenizer, stops, batch_size=3, progress=False)


def _reference_logprobs(model: Any, prompt: list[int], response: list[int]) -> torch.Tensor:
    """``[len(response)]`` log p(response[t] | prompt, response[:t]) from one plain forward."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
    return logprobs[positions, torch.tensor(response)]


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (1.7, 0.8), (0.5, 0.9)])
def test_recorded_logprobs_are_the_untempered_ones(
    generator: TransformersGenerator, temperature: float, top_p: float
) -> None:
    params = SamplingParams(temperature, top_p, num_samples=3, max_new_tokens=20, seed=7, logprobs=True)
    out = generator.generate(PROMPTS, params)
    checked = stopped = 0
    for prompt, row in zip(PROMPTS, out, strict=True):
        assert len(row) == 3
        for c in row:
            assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == c.num_tokens
            response = list(c.token_ids) + ([c.stop_token_id] if c.stop_token_id is not None else [])
            recorded = list(c.logprobs) + ([c.stop_logprob] if c.stop_token_id is not None else [])
            expected = _reference_logprobs(generator.model, prompt, response)
            assert torch.allclose(torch.tensor(recorded), expected, atol=1e-4, rtol=0), (c, expected)
            checked += len(response)
            stopped += c.finish_reason == "stop"
            assert (c.finish_reason == "stop") == (c.stop_token_id is not None)
            assert c.finish_reason == "stop" or c.num_tokens == 20
    assert checked > 100 and stopped > 0  # the end-of-sequence token's log-prob was checked too
    if temperature != 1.0:
        # The check can fail: the tempered distribution's log-probs differ from the recorded ones.
        c = out[0][0]
        tempered = torch.log_softmax(
            _logits(generator.model, PROMPTS[0], list(c.token_ids)) / temperature, dim=-1
        )
        positions = torch.arange(len(PROMPTS[0]) - 1, len(PROMPTS[0]) - 1 + c.num_tokens)
        assert not torch.allclose(
            tempered[positions, torch.tensor(c.token_ids)], torch.tensor(c.logprobs), atol=1e-4
        )


def _logits(model: Any, prompt: list[int], response: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt + response])).logits[0].float()


def test_same_seed_same_traces_and_another_seed_others(generator: TransformersGenerator) -> None:
    params = SamplingParams(1.0, 0.95, num_samples=2, max_new_tokens=12, seed=11, logprobs=True)
    first = generator.generate(PROMPTS, params)
    assert generator.generate(PROMPTS, params) == first
    other = generator.generate(PROMPTS, SamplingParams(1.0, 0.95, 2, 12, seed=12, logprobs=True))
    assert other != first


def test_greedy_equals_model_generate_on_each_prompt_alone(generator: TransformersGenerator) -> None:
    out = generator.generate(PROMPTS, SamplingParams(max_new_tokens=15, logprobs=True))
    model = generator.model
    for prompt, (c,) in zip(PROMPTS, out, strict=True):
        with torch.no_grad():
            plain = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=15, eos_token_id=2, pad_token_id=3
            )[0, len(prompt) :].tolist()
        ours = list(c.token_ids) + ([c.stop_token_id] if c.stop_token_id is not None else [])
        assert ours == plain, (prompt, ours, plain)
        assert c.logprobs is not None
        expected = _reference_logprobs(model, prompt, ours)
        recorded = list(c.logprobs) + ([c.stop_logprob] if c.stop_token_id is not None else [])
        assert torch.allclose(torch.tensor(recorded), expected, atol=1e-4, rtol=0)


def test_stop_strings_end_a_completion_where_its_text_first_holds_one() -> None:
    words = {1: "a", 2: "b", 3: "stop", 4: "c", 9: "</s>"}

    def decode(ids: list[int]) -> str:
        return " ".join(words[i] for i in ids)

    c = finish_completion([1, 2, 3, 4, 9], [-0.1, -0.2, -0.3, -0.4, -0.5], [9], ["st"], decode)
    assert (c.token_ids, c.logprobs, c.finish_reason, c.stop_token_id) == (
        (1, 2, 3),
        (-0.1, -0.2, -0.3),
        "stop",
        None,
    )
    c = finish_completion([1, 2, 9, 3, 3], [-0.1, -0.2, -0.5, 0, 0], [9], ["stop"], decode)  # EOS first
    assert (c.token_ids, c.stop_token_id, c.stop_logprob, c.text) == ((1, 2), 9, -0.5, "a b")
    c = finish_completion([1, 2, 4], None, [9], ["zz"], decode)
    assert (c.token_ids, c.finish_reason, c.logprobs) == ((1, 2, 4), "length", None)


def test_transformers_stops_at_a_stop_string(generator: TransformersGenerator) -> None:
    free = generator.generate(PROMPTS[:1], SamplingParams(max_new_tokens=10, logprobs=True))[0][0]
    assert free.num_tokens >= 3, free
    word = generator.tokenizer.decode([free.token_ids[2]])  # greedy: the same tokens again
    out = generator.generate(PROMPTS[:1], SamplingParams(max_new_tokens=10, stop=(word,), logprobs=True))
    c = out[0][0]
    assert c.finish_reason == "stop" and c.stop_token_id is None
    assert c.token_ids == free.token_ids[: len(c.token_ids)] and len(c.token_ids) <= 3
    assert word in generator.tokenizer.decode(list(c.token_ids))


def test_padded_output_columns_are_never_sampled(tmp_path: Path) -> None:
    """A checkpoint with more output columns than tokens (NeMo pads the embedding): the columns
    past the tokenizer are masked, and log-probs are over the tokenizer's vocabulary."""
    from helpers.hf_tiny import make_hf_checkpoint

    path = make_hf_checkpoint(tmp_path / "padded", "llama", seed=4, vocab_size=64, tokenizer_vocab=24)
    tokenizer = load_tokenizer(str(path))
    assert len(tokenizer) == 24
    gen = TransformersGenerator(str(path), tokenizer, stop_token_ids(str(path), tokenizer), 4, progress=False)
    params = SamplingParams(2.0, 1.0, num_samples=4, max_new_tokens=16, seed=1, logprobs=True)
    out = gen.generate(PROMPTS, params)
    drawn = [t for row in out for c in row for t in c.token_ids]
    assert len(drawn) > 100 and max(drawn) < 24  # unmasked, 40 of 64 columns would be drawn often
    c = out[1][0]
    logits = _logits(gen.model, PROMPTS[1], list(c.token_ids))[:, :24]
    positions = torch.arange(len(PROMPTS[1]) - 1, len(PROMPTS[1]) - 1 + c.num_tokens)
    expected = torch.log_softmax(logits, dim=-1)[positions, torch.tensor(c.token_ids)]
    assert c.logprobs is not None
    assert torch.allclose(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
