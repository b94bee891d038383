"""``make_loss_func`` inside bare megatron-core pipeline schedules equals plain autograd, per layout.

A tiny megatron-core ``GPTModel`` (local layer spec, fp32, RoPE, real vocabulary 60 padded to 64)
takes one training step through ``get_forward_backward_func()`` with our ``loss_func``, DDP and
``finalize_model_grads`` (``calculate_per_token_loss=True``), 2 micro-batches, at every layout of 2
ranks (DP=2, TP=2, PP=2) and of 4 ranks with two parallel dimensions (TP=2 x PP=2, TP=2 x DP=2,
PP=2 x DP=2). Losses: DisCorD (token variant, λ = 1, so its weights matter) with per-micro-batch
statistics (``stats=micro_batch``) and with carried ones (``stats=previous_step``, centred, τ = 0.5:
a :class:`~nemo_dcod.losses.carry.CarriedStats` holding fixed previous-step statistics weighs the
step, keeps its Δ, and at the step's end must hold the unsharded ``weight_stats`` of the whole
global batch), and the top-k KL.
The reference, built on every rank at TP=1 / PP=1 from a fixed seed, is plain autograd: full
model, ``loss_from_logits`` without groups, summed over micro-batches, divided by the global token
count. Each layout's model gets its shards of the reference's weights (init
RNG differs per pipeline rank, so seeds alone would not give the same model). Checked against the
reference: the loss sum and token count, every logged value reduced as Megatron-LM's
``train_step`` does, and every parameter's gradient, shard by shard.
"""

from __future__ import annotations

import re
from dataclasses import astuple
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers.dist_utils import run_distributed

from nemo_dcod.losses import LossContext, WeightStats, build_loss
from nemo_dcod.losses.carry import CarriedStats
from nemo_dcod.parallel.loss_inputs import loss_from_logits, student_loss_inputs

pytestmark = pytest.mark.distributed

MICRO_BATCHES, ROWS, SEQ, K = 2, 2, 8, 3  # ROWS: rows of a global micro-batch (split over DP)
VOCAB, PADDED_VOCAB, HIDDEN, HEADS, LAYERS = 60, 64, 16, 2, 2
STEP, TOTAL_STEPS = 3, 10
LOSSES: list[tuple[str, str, dict[str, Any]]] = [  # (label, loss name, parameters)
    ("discord", "discord", {"variant": "token", "tau": 1.0, "lambda_max": 1.0, "stats": "micro_batch"}),
    ("discord_carried", "discord", {"tau": 0.5, "center": True}),  # stats=previous_step
    ("kl", "kl", {}),
]
PREVIOUS = WeightStats(delta_mean=-1.5, g_mean=0.4, g_sq_mean=0.2)  # carried into the step


def _carries(params: dict[str, Any]) -> bool:
    return params.get("stats", "previous_step") == "previous_step"


def _batches() -> list[dict[str, torch.Tensor]]:
    """The global micro-batches, ``[ROWS, SEQ]`` each, with teacher fields as ``score`` writes them."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for m in range(MICRO_BATCHES):
        teacher = torch.log_softmax(2 * torch.randn(ROWS, SEQ, VOCAB, generator=gen), -1)
        labels = torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen)
        topk = teacher.topk(K, dim=-1).indices
        mask = (torch.rand(ROWS, SEQ, generator=gen) > 0.3).float()
        mask[:, :2] = 0  # the prompt
        if m == 1:
            mask[1] = 0  # a row without loss tokens: one DP rank has none in this micro-batch
        out.append(
            {
                "tokens": torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen),
                "position_ids": torch.arange(SEQ).expand(ROWS, SEQ).contiguous(),
                "labels": labels,
                "loss_mask": mask,
                "teacher_logprobs": teacher.gather(-1, labels[..., None])[..., 0],
                "teacher_topk_ids": topk,
                "teacher_topk_logprobs": teacher.gather(-1, topk),
            }
        )
    return out


def _build_gpt(tp: int, pp: int) -> Any:
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=2 * HIDDEN,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        calculate_per_token_loss=True,
    )
    return GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=PADDED_VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def _megatron_lm_reduce(logged: list[dict[str, torch.Tensor]], dp_group: Any) -> dict[str, torch.Tensor]:
    """What Megatron-LM's ``train_step`` logs: ``[s, n]`` summed over micro-batches and DP, else a mean."""
    out = {}
    for key in logged[0]:
        values = [x[key].view(-1) for x in logged]
        assert values[0].numel() in (1, 2), (
            f"{key}: Megatron-LM rejects a logged value of shape {values[0].shape}"
        )
        if values[0].numel() == 2:
            total = torch.vstack(values).sum(dim=0)
            if dp_group is not None:
                dist.all_reduce(total, group=dp_group)
            out[key] = total
        else:
            out[key] = torch.cat(values).mean()
    return out


def _reference(
    name: str, params: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], Any]:
    """Plain autograd on the TP=1 / PP=1 model: (logged values, gradients by parameter name, the
    whole global batch's ``weight_stats`` for a loss that carries statistics, else None)."""
    from nemo_dcod.model.megatron_loss import megatron_metrics

    model = _build_gpt(1, 1)
    loss = build_loss(name, **params)
    carried = _carries(params) and name == "discord"
    ctx = LossContext(step=STEP, total_steps=TOTAL_STEPS, stats=PREVIOUS if carried else None)
    total, tokens, logged, inputs = torch.zeros(()), torch.zeros((), dtype=torch.long), [], []
    for mb in _batches():
        logits = model(mb["tokens"], mb["position_ids"], None)
        if carried:
            inputs.append(student_loss_inputs(logits.detach(), mb, loss.requirements, vocab_size=VOCAB))  # type: ignore[arg-type]
        loss_sum, num_tokens, metrics = loss_from_logits(loss, logits, mb, ctx, vocab_size=VOCAB)  # type: ignore[arg-type]
        logged.append(megatron_metrics(loss_sum, num_tokens, metrics))
        total, tokens = total + loss_sum, tokens + num_tokens
    (total / tokens).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient in the reference: {missing}"
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    measured = loss.weight_stats(inputs, None) if carried else None
    return _megatron_lm_reduce(logged, None), grads, measured


def _global_name(name: str, pp_rank: int, pp: int) -> str:
    """The TP=1 / PP=1 name of a pipeline stage's parameter (layers are numbered per stage)."""
    offset = pp_rank * (LAYERS // pp)
    return re.sub(r"decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m[1]) + offset}.", name)


def _shard(full: torch.Tensor, param: torch.Tensor, tp: int, tp_rank: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return torch.chunk(full, tp, dim=param.partition_dim)[tp_rank]


def _run_layout(tp: int, pp: int, weights: dict[str, torch.Tensor], references: list[Any]) -> dict[str, Any]:
    """One training step per loss at this layout: logged values and (gradient, expected) per shard."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_dcod.model.megatron_loss import make_loss_func

    parallel_state.initialize_model_parallel(tp, pp, create_gloo_process_groups=False)
    try:
        model = _build_gpt(tp, pp)
        pp_rank, tp_rank = (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
        )
        names = {p: _global_name(n, pp_rank, pp) for n, p in model.named_parameters()}
        with torch.no_grad():
            for p, n in names.items():
                p.copy_(_shard(weights[n], p, tp, tp_rank))
        config = model.config
        config.finalize_model_grads_func = finalize_model_grads
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        rows = slice(dp_rank * ROWS // dp, (dp_rank + 1) * ROWS // dp)
        out: dict[str, Any] = {}
        for (label, name, params), (ref_logged, ref_grads, ref_stats) in zip(LOSSES, references, strict=True):
            loss = build_loss(name, **params)
            shapes: list[tuple[int, ...]] = []
            ddp.zero_grad_buffer()
            carry = CarriedStats(stats=PREVIOUS) if ref_stats is not None else None

            def forward_step(
                data_iterator: Any,
                model: Any,
                loss: Any = loss,
                shapes: list[Any] = shapes,
                carry: Any = carry,
            ) -> tuple[torch.Tensor, Any]:
                mb = next(data_iterator)
                logits = model(mb["tokens"], mb["position_ids"], None)  # no labels: [B, S, V/TP]
                shapes.append(tuple(logits.shape))
                return logits, make_loss_func(
                    loss, mb, step=STEP, total_steps=TOTAL_STEPS, vocab_size=VOCAB, carry=carry
                )

            logged = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter([{k: v[rows] for k, v in mb.items()} for mb in _batches()]),
                model=[ddp],
                num_microbatches=MICRO_BATCHES,
                seq_length=SEQ,
                micro_batch_size=ROWS // dp,
                forward_only=False,
            )
            measured = None
            if carry is not None and logged:  # the last stage kept its Δ; the step ends here
                got = carry.end_step(loss, dp_group)
                measured = ((got.delta_mean, got.g_mean, got.g_sq_mean), astuple(ref_stats))  # type: ignore[union-attr]
            out[label] = {
                "measured": measured,
                "logged": (_megatron_lm_reduce(logged, dp_group), ref_logged) if logged else None,
                "grads": {
                    n: (p.main_grad.clone(), _shard(ref_grads[n], p, tp, tp_rank)) for p, n in names.items()
                },
                "shapes": sorted(set(shapes)),
            }
        return out
    finally:
        parallel_state.destroy_model_parallel()


def _worker(rank: int, world: int, layouts: list[tuple[int, int]]) -> dict[str, Any]:
    from megatron.core import parallel_state

    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode

    enable_cpu_mode()
    parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    try:
        weights = {n: p.detach().clone() for n, p in _build_gpt(1, 1).named_parameters()}
        references = [_reference(name, params) for _, name, params in LOSSES]
        sft = _reference("discord", {"lambda_max": 0.0, "stats": "micro_batch"})[1]  # λ = 0
    finally:
        parallel_state.destroy_model_parallel()
    return {
        "weights_sum": sum(float(w.double().sum()) for w in weights.values()),
        "lambda_changes_grad": not torch.allclose(
            sft["output_layer.weight"], references[0][1]["output_layer.weight"]
        ),
        "layouts": {(tp, pp): _run_layout(tp, pp, weights, references) for tp, pp in layouts},
    }


def _check(results: list[dict[str, Any]]) -> None:
    assert len({r["weights_sum"] for r in results}) == 1, "the reference model differs across ranks"
    assert all(r["lambda_changes_grad"] for r in results), "λ = 1 and λ = 0 give the same gradient"
    for rank, result in enumerate(results):
        for (tp, pp), per_loss in result["layouts"].items():
            dp = len(results) // (tp * pp)
            for name, got in per_loss.items():
                where = f"rank {rank}, TP={tp} PP={pp} DP={dp}, {name}"
                if got["logged"] is not None:  # the last stage: batch-first vocab-parallel logits
                    assert got["shapes"] == [(ROWS // dp, SEQ, PADDED_VOCAB // tp)], (
                        f"{where}: {got['shapes']}"
                    )
                    if name == "discord_carried":
                        assert got["measured"] is not None, where
                        assert got["measured"][0] == pytest.approx(got["measured"][1], rel=1e-5), where
                    values, expected = got["logged"]
                    assert values.keys() == expected.keys(), f"{where}: logged keys {sorted(values)}"
                    for key in expected:
                        torch.testing.assert_close(
                            values[key],
                            expected[key],
                            rtol=1e-5,
                            atol=1e-6,
                            msg=lambda m, w=where, k=key: f"{w}, logged {k!r}: {m}",
                        )
                for param, (grad, want) in got["grads"].items():
                    assert torch.count_nonzero(want) > 0, f"{where}: {param} has no gradient in the reference"
                    torch.testing.assert_close(
                        grad,
                        want,
                        rtol=1e-5,
                        atol=1e-7,
                        msg=lambda m, w=where, p=param: f"{w}, grad {p}: {m}",
                    )


def test_loss_func_in_megatron_schedules_matches_plain_autograd() -> None:
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode

    enable_cpu_mode()  # once here (imports NeMo, ~10 s): the forked ranks inherit it
    world2 = run_distributed(_worker, 2, [(1, 1), (2, 1), (1, 2)])
    _check(world2)
    last_stage_logged = [r["layouts"][1, 2]["discord"]["logged"] for r in world2]
    assert [x is not None for x in last_stage_logged] == [False, True], "only the last stage logs"
    world4 = run_distributed(_worker, 4, [(2, 2), (2, 1), (1, 2)])
    _check(world4)
