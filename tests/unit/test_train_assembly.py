"""The 8B GPU recipe assembles into the NeMo objects it asks for (checked by configuration: FP8 and
Transformer Engine cannot run on a CPU machine; tests/gpu runs them where they can)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers.paths import ROOT

from nemo_dcod.config import load_config
from nemo_dcod.model.families import FAMILIES
from nemo_dcod.train.config import TrainConfig, padded_vocab_size


def test_gpu_recipe_reaches_nemo_precision_and_model_config() -> None:
    from nemo.collections.llm.gpt.model.base import local_layer_spec

    from nemo_dcod.model.steps import logits_forward_step, trace_data_step
    from nemo_dcod.train.run import _precision_plugin, build_model

    cfg = load_config(TrainConfig, ROOT / "conf/distill_llama8b.yaml", check=False)
    assert cfg.problems(has_gpu=True, check_paths=False) == []  # its store is made by prepare + score
    pr, p = cfg.precision, cfg.parallel
    dtype = _precision_plugin(cfg).dtype_config
    assert dtype.bf16 == (pr.dtype == "bf16") and dtype.fp8 == pr.fp8 and dtype.fp8_recipe == pr.fp8_recipe
    assert (dtype.fp8_amax_history_len, dtype.fp8_amax_compute_algo) == (
        pr.fp8_amax_history_len,
        pr.fp8_amax_compute_algo,
    )
    assert (
        dtype.first_last_layers_bf16,
        dtype.num_layers_at_start_in_bf16,
        dtype.num_layers_at_end_in_bf16,
    ) == (pr.first_last_layers_bf16, pr.num_layers_at_start_in_bf16, pr.num_layers_at_end_in_bf16)
    # The TE layer spec turns on fusions that need TE at config time: assemble with the local spec.
    cfg.model.spec = "local"
    model = build_model(cfg)
    gpt = model.config
    assert type(gpt).__name__ == FAMILIES[cfg.model.family][cfg.model.size]
    assert (gpt.tensor_model_parallel_size, gpt.sequence_parallel, gpt.pipeline_model_parallel_size) == (
        p.tensor_model_parallel_size,
        p.sequence_parallel,
        p.pipeline_model_parallel_size,
    )
    assert gpt.calculate_per_token_loss and gpt.params_dtype == torch.bfloat16
    assert gpt.vocab_size == padded_vocab_size(cfg.data.vocab_size, p.tensor_model_parallel_size)
    assert gpt.seq_length == cfg.data.seq_length
    assert gpt.transformer_layer_spec is local_layer_spec
    assert gpt.forward_step_fn is logits_forward_step and gpt.data_step_fn is trace_data_step
    optim = model.optim.config
    assert optim.use_distributed_optimizer == p.use_distributed_optimizer
    assert optim.bf16 == (pr.dtype == "bf16") and optim.clip_grad == cfg.optim.clip_grad
    assert (optim.lr, optim.min_lr, optim.weight_decay) == (
        cfg.optim.lr,
        cfg.optim.min_lr,
        cfg.optim.weight_decay,
    )
    assert model.loss_settings == cfg.loss and model.real_vocab_size == cfg.data.vocab_size


def test_each_spec_gets_the_attention_form_that_keeps_packed_documents_apart(tmp_path: Path) -> None:
    """TE on a packed store: THD boundaries (one row per micro-batch); the local layers: the dense
    block-diagonal mask; a store with one document per row: causality only (any spec)."""
    from nemo_dcod.data.config import PrepareConfig
    from nemo_dcod.data.prepare import run_prepare

    forms = {}
    for packing in ("best_fit", "none"):
        store = tmp_path / packing
        prepare = load_config(
            PrepareConfig, ROOT / "conf/prepare_tiny.yaml", [f"out_dir={store}", f"packing={packing}"]
        )
        run_prepare(prepare, quiet=True)
        for spec in ("te", "local"):
            cfg = load_config(
                TrainConfig,
                ROOT / "conf/train_store_tiny.yaml",
                [f"data.path={store}", f"model.spec={spec}", "trainer.micro_batch_size=1"],
                check=False,
            )
            assert cfg.problems(has_gpu=True) == [], (packing, spec)
            forms[packing, spec] = cfg.attention_form(cfg.store_facts(), cfg.uses_transformer_engine(True))
    assert forms == {
        ("best_fit", "te"): "thd",
        ("best_fit", "local"): "dense_mask",
        ("none", "te"): "causal",
        ("none", "local"): "causal",
    }
