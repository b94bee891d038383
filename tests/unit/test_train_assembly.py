"""The 8B GPU recipe assembles into the NeMo objects it asks for (checked by configuration: FP8 and
Transformer Engine cannot run on a CPU machine; tests/gpu runs them where they can)."""

from __future__ import annotations

from pathlib import Path

import torch

from nemo_dcod.config import load_config
from nemo_dcod.train.config import TrainConfig, padded_vocab_size

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_recipe_reaches_nemo_precision_and_model_config() -> None:
    from nemo.collections.llm.gpt.model.base import local_layer_spec

    from nemo_dcod.model.steps import logits_forward_step, trace_data_step
    from nemo_dcod.train.run import _precision_plugin, build_model

    cfg = load_config(TrainConfig, ROOT / "conf/distill_llama8b.yaml", check=False)
    assert cfg.problems(has_gpu=True, check_paths=False) == []  # its store is made by prepare + score
    dtype = _precision_plugin(cfg).dtype_config
    assert (dtype.bf16, dtype.fp8, dtype.fp8_recipe) == (True, "hybrid", "delayed")
    assert (dtype.fp8_amax_history_len, dtype.fp8_amax_compute_algo) == (1024, "max")
    assert (
        dtype.first_last_layers_bf16,
        dtype.num_layers_at_start_in_bf16,
        dtype.num_layers_at_end_in_bf16,
    ) == (
        True,
        1,
        1,
    )
    # The TE layer spec turns on fusions that need TE at config time: assemble with the local spec.
    cfg.model.spec = "local"
    model = build_model(cfg)
    gpt = model.config
    assert type(gpt).__name__ == "Llama31Config8B" and gpt.num_layers == 32
    assert (gpt.tensor_model_parallel_size, gpt.sequence_parallel, gpt.pipeline_model_parallel_size) == (
        2,
        True,
        1,
    )
    assert gpt.calculate_per_token_loss and gpt.params_dtype == torch.bfloat16
    assert gpt.vocab_size == padded_vocab_size(128256, 2) == 128256
    assert gpt.transformer_layer_spec is local_layer_spec
    assert gpt.forward_step_fn is logits_forward_step and gpt.data_step_fn is trace_data_step
    optim = model.optim.config
    assert optim.use_distributed_optimizer and optim.bf16 and optim.clip_grad == 1.0
    assert model.loss_settings["name"] == "discord" and model.real_vocab_size == 128256


def test_transformer_engine_spec_refuses_a_store_with_packed_documents(tmp_path: Path) -> None:
    """TE's fused causal attention ignores the block-diagonal mask: a packed store needs the local spec."""
    from nemo_dcod.data.config import PrepareConfig
    from nemo_dcod.data.prepare import run_prepare

    store = tmp_path / "store"
    run_prepare(load_config(PrepareConfig, ROOT / "conf/prepare_tiny.yaml", [f"out_dir={store}"]), quiet=True)
    overrides = [f"data.path={store}"]
    te = load_config(
        TrainConfig, ROOT / "conf/train_store_tiny.yaml", [*overrides, "model.spec=te"], check=False
    )
    problems = te.problems(has_gpu=True)
    assert any("would let each document attend to the ones before it" in p for p in problems), problems
    local = load_config(
        TrainConfig, ROOT / "conf/train_store_tiny.yaml", [*overrides, "model.spec=local"], check=False
    )
    assert local.problems(has_gpu=True) == []
