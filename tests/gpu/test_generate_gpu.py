"""``nemo-dcod generate`` with the vLLM back end (skipped without CUDA, or without vLLM installed):
the stop token's log-prob is recorded as with transformers.

The teacher is ``tests/unit/test_generate_stop.py``'s: a tiny random Llama whose template ends a
turn with ``</s>`` while its checkpoint names ``<unk>`` as end of sequence. Every trace that
ended with ``</s>`` keeps it last, and every recorded log-prob (the stop's included) equals
``log_softmax`` of a plain fp32 transformers forward (vLLM's raw log-probs, bf16-free: fp32).

Run on a GPU machine with vLLM: ``pytest -m gpu tests/gpu/test_generate_gpu.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemo_dcod.config import load_config
from nemo_dcod.generate.config import GenerateConfig

pytestmark = pytest.mark.gpu
END, OTHER_EOS = 2, 0


def test_vllm_records_the_stop_tokens_logprob(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from helpers.hf_tiny import make_hf_checkpoint
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    from nemo_dcod.generate.plan import build_plan
    from nemo_dcod.generate.run import run_generate

    teacher = make_hf_checkpoint(tmp_path / "hf", "llama", seed=3, vocab_size=32)
    GenerationConfig(bos_token_id=1, eos_token_id=OTHER_EOS, pad_token_id=3).save_pretrained(teacher)
    PreTrainedTokenizerFast.from_pretrained(teacher, eos_token="<unk>").save_pretrained(teacher)
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"q": f"w{i} w{i + 3}"}) + "\n" for i in range(8)))
    cfg = load_config(
        GenerateConfig,
        None,
        [
            f"inputs=[{problems}]",
            f"teacher={teacher}",
            "fields.problem=q",
            "prompt_template='{problem}'",
            "sampling.samples_per_problem=8",
            "sampling.max_new_tokens=12",
            "backend=vllm",
            "dtype=float32",
            "gpu_memory_utilization=0.3",
            "progress=false",
            f"out_dir={tmp_path / 'out'}",
        ],
    )
    plan = build_plan(cfg)
    assert plan.stop_ids == [OTHER_EOS, END]
    run_generate(cfg)
    out = Path(cfg.out_dir)
    traces = [
        json.loads(x) for f in sorted((out / "traces").glob("*.jsonl")) for x in f.read_text().splitlines()
    ]
    assert json.loads((out / "meta" / "shard-00000.json").read_text())["backend"] == "vllm"
    ended = [t for t in traces if t["teacher_tokens"] and t["teacher_tokens"][-1] == END]
    assert ended and all(END not in t["teacher_tokens"][:-1] for t in traces)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    prompts = {p.id: ids for p, ids in zip(plan.problems, plan.prompt_ids, strict=True)}
    for t in ended:
        prompt, response = prompts[t["id"]], t["teacher_tokens"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
        expected = torch.log_softmax(logits, -1)[positions, torch.tensor(response)]
        assert torch.allclose(torch.tensor(t["teacher_logprobs"]), expected, atol=1e-3, rtol=0), t
