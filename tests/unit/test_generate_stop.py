"""The token that ends a teacher's turn: ``generate`` stops at the chat template's end-of-turn token
and records its log-prob (both back ends), and ``prepare`` puts that log-prob on the end-of-turn
token of its rendering.

The teacher is a tiny random Llama with a 32-token vocabulary (it writes ``</s>`` often) whose
checkpoint names another end-of-sequence id (``<unk>``) than the token its template writes after a
turn (``</s>``), as converted checkpoints do (a ChatML model whose generation config names
``<|endoftext|>``): before, such a teacher wrote past its turn and no trace kept a stop log-prob.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nemo_dcod.config import load_config
from nemo_dcod.eval.generation import SamplingParams
from nemo_dcod.eval.vllm_outputs import completion_from_vllm
from nemo_dcod.generate.config import GenerateConfig

END = 2  # </s>: what the template writes after a turn
OTHER_EOS = 0  # <unk>: what the checkpoint names as its end of sequence


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.hf_tiny import make_hf_checkpoint
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    path = make_hf_checkpoint(tmp_path_factory.mktemp("teacher") / "hf", "llama", seed=3, vocab_size=32)
    GenerationConfig(bos_token_id=1, eos_token_id=OTHER_EOS, pad_token_id=3).save_pretrained(path)
    PreTrainedTokenizerFast.from_pretrained(path, eos_token="<unk>").save_pretrained(path)
    return path


def _cfg(teacher: Path, tmp_path: Path) -> GenerateConfig:
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"q": f"w{i} w{i + 3}"}) + "\n" for i in range(8)))
    return load_config(
        GenerateConfig,
        None,
        [
            f"inputs=[{problems}]",
            f"teacher={teacher}",
            "fields.problem=q",
            "prompt_template='{problem}'",
            "sampling.samples_per_problem=4",
            "sampling.max_new_tokens=12",
            "sampling.seed=1",
            "batch_size=16",
            "progress=false",
            f"out_dir={tmp_path / 'out'}",
        ],
    )


def test_the_end_of_turn_token_stops_generation_and_carries_its_logprob(
    teacher: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from nemo_dcod.data.config import PrepareConfig
    from nemo_dcod.data.prepare import run_prepare
    from nemo_dcod.data.tokenize import load_tokenizer, vocabulary_fingerprint
    from nemo_dcod.generate.plan import build_plan
    from nemo_dcod.generate.run import run_generate

    cfg = _cfg(teacher, tmp_path)
    plan = build_plan(cfg)
    assert plan.end_of_turn_id == END and plan.stop_ids == [OTHER_EOS, END]
    run_generate(cfg)
    out = Path(cfg.out_dir)
    traces = [
        json.loads(x) for f in sorted((out / "traces").glob("*.jsonl")) for x in f.read_text().splitlines()
    ]
    ended = [t for t in traces if t["teacher_tokens"] and t["teacher_tokens"][-1] == END]
    assert len(ended) >= 3, [t["teacher_tokens"] for t in traces]
    assert all(END not in t["teacher_tokens"][:-1] for t in traces)  # nothing written past the turn
    meta = json.loads((out / "meta" / "shard-00000.json").read_text())
    assert meta["stop_token_ids"] == [OTHER_EOS, END] and meta["end_of_turn_token"] == END

    # Each recorded stop log-prob is the teacher's: log_softmax of one plain forward at that position.
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    prompts = {p.id: ids for p, ids in zip(plan.problems, plan.prompt_ids, strict=True)}
    for t in ended:
        prompt, response = prompts[t["id"]], t["teacher_tokens"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
        expected = torch.log_softmax(logits, -1)[len(prompt) - 1 + len(response) - 1, END].item()
        assert abs(t["teacher_logprobs"][-1] - expected) < 1e-4, (t, expected)

    # prepare, from the config generate wrote: the same vocabulary, the stop log-prob on </s>.
    prep_cfg = load_config(
        PrepareConfig, out / "prepare.yaml", ["seq_length=64", f"out_dir={tmp_path / 'store'}"]
    )
    assert prep_cfg.teacher_tokenizer_fingerprint == vocabulary_fingerprint(load_tokenizer(str(teacher)))
    report = run_prepare(prep_cfg, quiet=True)
    stopped = [t for t in traces if t["finish_reason"] == "stop" and t["num_tokens"] > 0]
    assert report["records_kept"] == len(stopped), report
    assert report["stop_logprobs"] == len([t for t in ended if t["num_tokens"] > 0]), report
    assert report["skipped"].get("cut_off") == sum(t["finish_reason"] == "length" for t in traces), report
    # Traces that stopped at <unk> (not the template's end of turn) get the fill value there.
    assert report["teacher_filled_tokens"] == len(stopped) - report["stop_logprobs"], report


@dataclass
class _Logprob:  # vllm.sequence.Logprob's fields that are read
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class _CompletionOutput:  # vllm.outputs.CompletionOutput's fields that are read
    token_ids: list[int]
    logprobs: list[dict[int, _Logprob]] | None


def _decode(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def test_vllm_outputs_keep_the_stop_token_and_its_logprob() -> None:
    """vLLM keeps the token that stopped a request last in ``token_ids``, with its log-prob
    (``logprobs=0``: a dict holding the sampled id)."""
    params = SamplingParams(1.0, logprobs=True)
    steps = [{5: _Logprob(-0.5)}, {7: _Logprob(-1.5), 9: _Logprob(-0.1)}, {END: _Logprob(-0.25)}]
    c = completion_from_vllm(_CompletionOutput([5, 7, END], steps), params, [OTHER_EOS, END], _decode)
    assert (c.token_ids, c.logprobs, c.finish_reason) == ((5, 7), (-0.5, -1.5), "stop")
    assert (c.stop_token_id, c.stop_logprob) == (END, -0.25)
    cut = completion_from_vllm(_CompletionOutput([5, 7], steps[:2]), params, [END], _decode)
    assert (cut.finish_reason, cut.stop_token_id, cut.stop_logprob) == ("length", None, None)
    plain = completion_from_vllm(_CompletionOutput([5, END], None), SamplingParams(), [END], _decode)
    assert plain.logprobs is None and plain.stop_token_id == END
    with pytest.raises(RuntimeError, match="no log-prob entries for 3 generated tokens"):
        completion_from_vllm(_CompletionOutput([5, 7, END], None), params, [END], _decode)
    with pytest.raises(RuntimeError, match="lack its sampled id 7"):
        completion_from_vllm(
            _CompletionOutput([5, 7], [steps[0], {9: _Logprob(-0.1)}]), params, [END], _decode
        )


def test_a_template_whose_turn_ends_in_plain_text_has_no_end_of_turn_token(
    teacher: Path, tmp_path: Path
) -> None:
    """Only a special token (or an end-of-sequence id) is an end-of-turn: a template ending turns
    with a word would otherwise stop every trace at that word."""
    from nemo_dcod.generate.plan import build_plan

    cfg = _cfg(teacher, tmp_path)
    cfg.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} w9 {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    plan = build_plan(cfg)
    assert plan.end_of_turn_id is None and plan.stop_ids == [OTHER_EOS]
