"""The memory estimate's parameter counts equal megatron-core's, per rank, at TP=2 x PP=2.

Each family's tiny NeMo config (Llama: untied, no bias; Qwen2.5: QKV bias, tied embeddings, so
the last pipeline stage would hold its own copy of the output layer; Qwen3: QK-norm) is built by NeMo's
``configure_model`` under a real 4-rank gloo Megatron parallel state, and every rank's
``numel`` is compared with :func:`~nemo_dcod.train.memory.parameters_per_rank`.

Tied embeddings are built at PP = 1 only: with PP > 1 megatron-core copies the shared weight to
the last stage with ``weight.data.cuda()`` (a tensor method the CPU mode cannot redirect), so
Qwen2.5 is built both tied (PP = 1 only) and untied.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers.dist_utils import run_distributed

pytestmark = [pytest.mark.distributed]

FAMILIES = ("llama3.1", "qwen2.5", "qwen3")
# (family, tied embeddings): NeMo's Qwen2.5 configs are untied by default; small Qwen2.5 tie them.
MODELS = [(f, False) for f in FAMILIES] + [("qwen2.5", True)]
VOCAB = 256  # a multiple of 128 x TP, as train pads


def _worker(rank: int, world: int) -> dict[str, Any]:
    import torch
    from megatron.core import parallel_state, tensor_parallel

    from nemo_dcod.model.families import build_gpt_config
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode
    from nemo_dcod.train.memory import Architecture, parameters_per_rank

    enable_cpu_mode()
    out: dict[str, Any] = {}
    for tp, pp in ((1, 1), (2, 2), (1, 4)):
        parallel_state.initialize_model_parallel(tp, pp, create_gloo_process_groups=False)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        try:
            for family, tied in MODELS:
                if tied and pp > 1:
                    continue
                config = build_gpt_config(
                    family,
                    "tiny",
                    padded_vocab_size=VOCAB,
                    seq_length=16,
                    parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
                    precision={"params_dtype": torch.float32, "pipeline_dtype": torch.float32},
                    overrides={"share_embeddings_and_output_weights": tied},
                    use_te=False,
                )
                model = config.configure_model(None)
                stage = parallel_state.get_pipeline_model_parallel_rank()
                actual = sum(p.numel() for p in model.parameters())
                expected = parameters_per_rank(Architecture.of(config), tp, pp, stage)
                out[f"{family}{' tied' if tied else ''} TP={tp} PP={pp} stage {stage}"] = (actual, expected)
        finally:
            parallel_state.destroy_model_parallel()
    return out


def test_parameters_per_rank_equal_megatron_core() -> None:
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode

    enable_cpu_mode()  # imports NeMo once here; the forked ranks inherit it
    results = run_distributed(_worker, 4, timeout=300)
    checked = 0
    for rank, result in enumerate(results):
        assert len(result) == 3 * len(FAMILIES) + 1, result
        for what, (actual, expected) in result.items():
            assert actual == expected, f"rank {rank}, {what}: megatron-core {actual}, estimate {expected}"
            checked += 1
    assert checked == 4 * (3 * len(FAMILIES) + 1)
