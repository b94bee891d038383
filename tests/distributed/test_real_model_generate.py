"""``generate -> prepare`` on the real pretrained model (SmolLM2-135M-Instruct, ``helpers.real_model``):
its 49,152-token byte-level BPE and its ChatML template, where issue 22 found three defects.

One run of ``nemo-dcod generate`` (6 problems x 4 samples, 64 new tokens at temperature 1, two
shards) and ``nemo-dcod prepare`` from the ``prepare.yaml`` it writes, checked for:

* **the stop token's log-prob**: every trace that stopped keeps ``<|im_end|>`` as its last token,
  with the log-prob a plain forward of the model gives it, and in the store the ``<|im_end|>``
  label of its document carries that value, not ``teacher_fill_logprob`` (set to -7 here so that
  no real log-prob can be taken for it); the newline ChatML writes after it is the one filled token;
* **same-tokenizer traces keep their sampled ids**: every stopped trace is kept with its labels
  exactly the sampled ids, although some of them re-tokenize differently (the model samples
  ``Ġsub``, ``division`` where the tokenizer makes ``Ġsubdivision``); prepare without the
  vocabulary fingerprint (the old way) drops exactly those as ``teacher_tokens_mismatch``;
* **cut-off traces** (``finish_reason: length``) are left out, counted as ``cut_off``; with
  ``cut_off=keep`` they end with their last sampled token (no ``<|im_end|>``).

Measured 2026-12-07: 29 s of CPU (one torch thread), 164 s wall on 2 cores shared with three
other jobs (load ~12); 24 traces, 8 stopped, 16 cut off, 7 of them split otherwise by
re-tokenizing. Plus the session fixture's one-off conversion (~35-85 s, then cached).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nemo_dcod.config import load_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

QUESTIONS = [
    "What is 12 + 7?",
    "Name a primary colour and say why.",
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Explain what a prime number is.",
    "How many legs does a spider have?",
]
FILL = -7.0
END_OF_TURN = "<|im_end|>"


def _traces(out: Path) -> list[dict[str, Any]]:
    files = sorted((out / "traces").glob("shard-*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def _documents(store: Path) -> list[dict[str, Any]]:
    """Every document of the store with the trace it came from: its trained labels and their
    teacher log-probs."""
    from nemo_dcod.data.store import PackedStore

    data = PackedStore(store)
    out = []
    for k, name in enumerate(data.shards):
        info = json.loads((data.path / "shards" / name / "shard.json").read_text())
        lines = Path(info["input"]["path"]).read_text().splitlines()
        for row, start, length, index in np.load(data.path / "shards" / name / "documents.npy"):
            cols = data.row(int(data.offsets[k] + row))
            sl = slice(int(start), int(start + length))
            tokens, mask, teacher = (
                cols["tokens"][sl],
                cols["loss_mask"][sl] > 0,
                cols["teacher_logprobs"][sl],
            )
            trained = np.flatnonzero(mask)
            out.append(
                {
                    "trace": json.loads(lines[int(index)]),
                    "labels": tokens[trained + 1].tolist(),
                    "logprobs": teacher[trained],
                }
            )
    return out


def test_generate_then_prepare_on_the_real_model(real_model: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_dcod.data.config import PrepareConfig
    from nemo_dcod.data.prepare import run_prepare
    from nemo_dcod.generate.config import GenerateConfig
    from nemo_dcod.generate.plan import build_plan
    from nemo_dcod.generate.run import run_generate

    torch.set_num_threads(1)  # 2 cores shared with other jobs: more threads oversubscribe them (issue 22, 9)
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "q": q}) + "\n" for i, q in enumerate(QUESTIONS)))
    out = tmp_path / "gen"
    cfg = load_config(
        GenerateConfig,
        None,
        [
            f"inputs=[{problems}]",
            f"teacher={real_model.hf_dir}",
            "fields.problem=q",
            "fields.id=id",
            "prompt_template='{problem}'",
            "sampling.samples_per_problem=4",
            "sampling.temperature=1.0",
            "sampling.max_new_tokens=64",
            "sampling.seed=2",
            "batch_size=12",
            "problems_per_shard=3",
            "dtype=float32",
            "device=cpu",
            "progress=false",
            f"out_dir={out}",
        ],
    )
    run_generate(cfg)
    tok = AutoTokenizer.from_pretrained(real_model.hf_dir)
    end = tok.convert_tokens_to_ids(END_OF_TURN)
    traces = _traces(out)
    stopped = [t for t in traces if t["finish_reason"] == "stop" and t["num_tokens"] > 0]
    cut = [t for t in traces if t["finish_reason"] == "length"]
    assert len(traces) == 24 and len(stopped) >= 4 and cut, [t["finish_reason"] for t in traces]
    assert all(t["teacher_tokens"][-1] == end for t in stopped), [t["teacher_tokens"][-3:] for t in stopped]

    # The recorded stop log-probs are the model's: one plain forward per stopped trace.
    plan = build_plan(cfg)
    prompts = {p.id: ids for p, ids in zip(plan.problems, plan.prompt_ids, strict=True)}
    model = AutoModelForCausalLM.from_pretrained(real_model.hf_dir, dtype=torch.float32).eval()
    for t in stopped:
        prompt, response = prompts[t["id"]], t["teacher_tokens"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
        expected = torch.log_softmax(logits, -1)[positions, torch.tensor(response)]
        recorded = torch.tensor(t["teacher_logprobs"])
        assert torch.allclose(recorded, expected, atol=2e-4, rtol=0), (
            t["id"],
            (recorded - expected).abs().max(),
        )
    del model

    # prepare, from generate's prepare.yaml (the teacher's tokenizer and its vocabulary fingerprint).
    overrides = ["seq_length=256", f"teacher_fill_logprob={FILL}"]
    prep = load_config(PrepareConfig, out / "prepare.yaml", [*overrides, f"out_dir={tmp_path / 'store'}"])
    report = run_prepare(prep, quiet=True)
    assert report["skipped"] == {"cut_off": len(cut)}, report
    assert report["records_kept"] == len(stopped) == report["stop_logprobs"], report
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and report["teacher_filled_tokens"] == len(stopped), report  # the "\n"s
    documents = _documents(tmp_path / "store")
    assert sorted((d["trace"]["id"], d["trace"]["sample"]) for d in documents) == sorted(
        (t["id"], t["sample"]) for t in stopped
    )
    for d in documents:
        t = d["trace"]
        # The sampled ids as they are, <|im_end|> with its log-prob, then the template's newline.
        assert d["labels"] == [*t["teacher_tokens"], *newline], t["id"]
        np.testing.assert_allclose(d["logprobs"][:-1], np.asarray(t["teacher_logprobs"], dtype=np.float32))
        assert d["logprobs"][-2] != FILL and d["logprobs"][-1] == FILL

    # Cut-off traces kept (cut_off=keep): each with its sampled ids and no end-of-turn.
    keep = load_config(
        PrepareConfig, out / "prepare.yaml", [*overrides, "cut_off=keep", f"out_dir={tmp_path / 'store_all'}"]
    )
    report = run_prepare(keep, quiet=True)
    nonempty = [t for t in traces if t["num_tokens"] > 0]
    assert report["skipped"] == {} and report["records_kept"] == len(nonempty), report
    assert report["cut_off_kept"] == len(cut) and report["stop_logprobs"] == len(stopped), report
    for d in _documents(tmp_path / "store_all"):
        t = d["trace"]
        assert d["labels"] == t["teacher_tokens"] + (newline if t["finish_reason"] == "stop" else []), t["id"]

    # The old way (re-tokenize the text, compare ids) loses every trace the tokenizer splits
    # otherwise than the model sampled it.
    def sampled(t: dict[str, Any]) -> list[int]:
        return t["teacher_tokens"][:-1] if t["finish_reason"] == "stop" else t["teacher_tokens"]

    split_otherwise = [
        t for t in nonempty if tok(t["response"], add_special_tokens=False)["input_ids"] != sampled(t)
    ]
    assert split_otherwise, "no sampled trace re-tokenizes differently: the check below would prove nothing"
    old = load_config(
        PrepareConfig,
        out / "prepare.yaml",
        [
            *overrides,
            "cut_off=keep",
            "teacher_tokenizer_fingerprint=null",
            f"out_dir={tmp_path / 'store_old'}",
        ],
    )
    old_report = run_prepare(old, quiet=True)
    assert old_report["skipped"] == {"teacher_tokens_mismatch": len(split_otherwise)}, old_report
    print(
        f"real model: {len(traces)} traces, {len(stopped)} stopped, {len(cut)} cut off; re-tokenizing "
        f"drops {len(split_otherwise)} of {len(nonempty)}, the sampled ids keep all"
    )
