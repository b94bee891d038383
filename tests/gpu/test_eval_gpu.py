"""GPU tests of ``nemo-dcod eval`` (skipped without CUDA): the transformers back end on CUDA in
fp32 and bf16, and the vLLM back end when vLLM is installed.

Run on a GPU machine: ``pytest -m gpu tests/gpu/test_eval_gpu.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.paths import ROOT

from nemo_dcod.config import load_config
from nemo_dcod.eval.config import EvalConfig
from nemo_dcod.eval.generation import (
    SamplingParams,
    TransformersGenerator,
    VLLMGenerator,
    load_tokenizer,
    resolve_backend,
    stop_token_ids,
)
from nemo_dcod.eval.run import run_eval

pytestmark = pytest.mark.gpu
PROMPTS = [[1, 10, 11], [1, 12, 13, 14, 15, 16, 17], [1, 20]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.hf_tiny import make_hf_checkpoint

    return make_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", "llama")


def test_transformers_on_cuda(checkpoint: Path, tmp_path: Path) -> None:
    path = str(checkpoint)
    tokenizer = load_tokenizer(path)
    stops = stop_token_ids(path, tokenizer)
    params = SamplingParams(max_new_tokens=10)
    batched = TransformersGenerator(path, tokenizer, stops, 3, "float32", "cuda", False).generate(
        PROMPTS, params
    )
    single = TransformersGenerator(path, tokenizer, stops, 1, "float32", "cuda", False).generate(
        PROMPTS, params
    )
    assert batched == single  # left padding is right on CUDA kernels too
    overrides = [
        f"models=[{{path: {path}, label: bf16}}]",
        "device=cuda",
        "dtype=bfloat16",
        "sampling.temperature=1.0",
        "sampling.num_samples=4",
        "progress=false",
        f"out_dir={tmp_path}",
    ]
    results = run_eval(load_config(EvalConfig, ROOT / "conf/eval_tiny.yaml", overrides))
    bench = results["models"]["bf16"]["benchmarks"]["gsm8k"]
    assert (bench["metric"], bench["k"]) == ("avg@4", 4)
    assert json.loads((tmp_path / "results.json").read_text())["models"] == results["models"]


def test_vllm_backend_generates(checkpoint: Path) -> None:
    pytest.importorskip("vllm")
    assert resolve_backend("auto", "auto") == "vllm"
    path = str(checkpoint)
    gen = VLLMGenerator(path, path, stop_token_ids(path, load_tokenizer(path)), gpu_memory_utilization=0.3)
    out = gen.generate(PROMPTS, SamplingParams(temperature=1.0, num_samples=3, max_new_tokens=5))
    assert [len(row) for row in out] == [3, 3, 3]
    assert all(0 <= c.num_tokens <= 5 and c.finish_reason in ("stop", "length") for row in out for c in row)
    greedy = gen.generate(PROMPTS, SamplingParams(max_new_tokens=5))
    assert [len(row) for row in greedy] == [1, 1, 1]
    gen.close()
