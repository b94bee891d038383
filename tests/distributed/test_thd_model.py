"""Packed rows as THD through a real megatron-core GPT, at TP / SP / CP layouts, against the dense path.

The reference is the path training already uses on CPU: megatron-core's local attention with the
block-diagonal mask of ``collate_packed``, one process. Each case runs the same packed row (three
documents and a padding run, lengths chosen so that context parallelism must pad every document)
through the plug-in's THD path: ``collate_thd`` -> ``trace_data_step`` (this rank's balanced
chunks under CP) -> ``logits_forward_step`` (``PackedSeqParams``, no mask) -> DisCorD through
``loss_from_logits`` (centred: its global mean is reduced over the data x context-parallel group).
Only the attention kernel is a stand-in for Transformer Engine's (:mod:`helpers.thd_reference`). Checked
per case: every real token's logits, the loss, and every parameter's gradient (shards gathered
to the full tensor, context-parallel partial sums added as DDP does) against the reference, in
fp32: logits and each gradient to 1e-5 of the largest entry (seen: <= 4e-6), the loss to rel 1e-6.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers.dist_utils import run_distributed

pytestmark = [pytest.mark.distributed]

DOCS = (7, 12, 5)  # document lengths; the row's remaining 8 positions are padding
ROW = 32
VOCAB = 96


def _sample() -> dict[str, torch.Tensor]:
    """One store row (label-aligned fields, as ``PackedStore`` returns them)."""
    gen = torch.Generator().manual_seed(7)
    segments = torch.cat(
        [torch.full((n,), i) for i, n in enumerate(DOCS)] + [torch.full((ROW - sum(DOCS),), -1)]
    )
    tokens = torch.randint(0, VOCAB, (ROW,), generator=gen)
    same_next = torch.zeros(ROW, dtype=torch.bool)
    same_next[:-1] = segments[1:] == segments[:-1]
    real_next = same_next & (segments >= 0)
    labels = torch.where(real_next, tokens.roll(-1), 0)
    positions = torch.cat([torch.arange(n) for n in DOCS] + [torch.arange(ROW - sum(DOCS))])
    return {
        "tokens": tokens,
        "labels": labels,
        "position_ids": positions,
        "segment_ids": segments,
        "loss_mask": real_next.float(),
        "teacher_logprobs": torch.where(real_next, -torch.rand(ROW, generator=gen) * 3, 0.0),
    }


def _shard(name: str, full: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    """This rank's shard of a full weight, as megatron-core lays it out: contiguous chunks, except
    the gated MLP's FC1, whose rank holds its chunk of the gate and its chunk of the up projection."""
    if "linear_fc1" in name:
        gate, up = full.chunk(2, dim)
        return torch.cat([gate.chunk(tp, dim)[rank], up.chunk(tp, dim)[rank]], dim)
    return full.chunk(tp, dim)[rank]


def _unshard(name: str, shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    if "linear_fc1" in name:
        halves = [s.chunk(2, dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
    return torch.cat(shards, dim)


def _set_weights(model: torch.nn.Module, tp: int, tp_rank: int) -> None:
    """Every parameter from a seeded full tensor, this rank's tensor-parallel shard of it."""
    for i, (name, param) in enumerate(model.named_parameters()):
        dim = getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else -1
        full = list(param.shape)
        if dim >= 0:
            full[dim] *= tp
        gen = torch.Generator().manual_seed(1000 + i)
        value = torch.randn(full, generator=gen) * (0.3 if "norm" not in name else 0.05) + ("norm" in name)
        with torch.no_grad():
            param.copy_(_shard(name, value, dim, tp, tp_rank) if dim >= 0 else value)


def _full_grads(model: torch.nn.Module, tp: int) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    cp_group = parallel_state.get_context_parallel_group()
    out = {}
    for name, param in model.named_parameters():
        grad = param.grad.detach().clone()
        torch.distributed.all_reduce(grad, group=cp_group)  # CP ranks hold partial sums (DDP adds them)
        if getattr(param, "sequence_parallel", False) and tp > 1:
            torch.distributed.all_reduce(grad, group=tp_group)  # as finalize_model_grads does with SP
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            shards = [torch.empty_like(grad) for _ in range(tp)]
            torch.distributed.all_gather(shards, grad, group=tp_group)
            grad = _unshard(name, shards, param.partition_dim)
        out[name] = grad
    return out


def _worker(rank: int, world: int, tp: int, cp: int, sp: bool, thd: bool) -> dict[str, Any]:
    from helpers.thd_reference import thd_layer_spec
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from nemo_dcod.data.store import collate_packed
    from nemo_dcod.data.thd import collate_thd, cp_partition_index, padded_length, row_multiple
    from nemo_dcod.losses import LossContext, build_loss
    from nemo_dcod.model.families import build_gpt_config
    from nemo_dcod.model.steps import logits_forward_step, trace_data_step
    from nemo_dcod.parallel.cpu_mode import HostTensor, enable_cpu_mode
    from nemo_dcod.parallel.loss_inputs import loss_from_logits

    enable_cpu_mode()
    parallel_state.initialize_model_parallel(
        tp, 1, context_parallel_size=cp, create_gloo_process_groups=False
    )
    try:
        model_parallel_cuda_manual_seed(1234)
        sample = _sample()
        doc_multiple, row_multiple_ = row_multiple(cp, tp, sp)
        if thd:
            row_length = padded_length(sample["segment_ids"], doc_multiple, row_multiple_)
            batch = collate_thd([sample], doc_multiple, row_length)
        else:
            row_length = ROW
            batch = collate_packed([sample], attention_mask=True)
        config = build_gpt_config(
            "llama3.1",
            "tiny",
            padded_vocab_size=128,
            seq_length=row_length,
            parallel={"tensor_model_parallel_size": tp, "context_parallel_size": cp, "sequence_parallel": sp},
            precision={},
        )
        if thd:
            config.transformer_layer_spec = thd_layer_spec
        model = config.configure_model(None)
        _set_weights(model, tp, parallel_state.get_tensor_model_parallel_rank())
        host = {k: v.as_subclass(HostTensor) for k, v in batch.items()}
        step = trace_data_step(iter([host]))
        logits = logits_forward_step(model, step)  # [1, T/CP, V/TP]
        loss = build_loss("discord", tau=1.0, center=True)
        ctx = LossContext(dp_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        fields = {
            k: v
            for k, v in step.items()
            if v is not None and k in ("labels", "loss_mask", "segment_ids", "teacher_logprobs")
        }
        loss_sum, num_tokens, _ = loss_from_logits(
            loss,
            logits,
            fields,
            ctx,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            vocab_size=VOCAB,
        )
        loss_sum.backward()
        totals = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
        torch.distributed.all_reduce(totals, group=parallel_state.get_context_parallel_group())
        # Every real token's logits, keyed by (document, offset), vocabulary shards gathered.
        full = logits.detach()[0]
        if tp > 1:
            shards = [torch.empty_like(full) for _ in range(tp)]
            torch.distributed.all_gather(
                shards, full.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
            )
            full = torch.cat(shards, dim=-1)
        if thd:
            offsets = batch.get("cu_seqlens_padded", batch["cu_seqlens"])[0].long()
            positions = (
                cp_partition_index(offsets, cp, parallel_state.get_context_parallel_rank())
                if cp > 1
                else torch.arange(row_length)
            )
        else:
            offsets = torch.tensor([0, *torch.tensor(DOCS).cumsum(0).tolist()])
            positions = torch.arange(ROW)
        by_token = {}
        for k, pos in enumerate(positions.tolist()):
            doc = int(torch.bucketize(torch.tensor(pos), offsets[1:], right=True))
            off = pos - int(offsets[doc])
            if doc < len(DOCS) and off < DOCS[doc]:
                by_token[(doc, off)] = full[k, :VOCAB]
        grads = _full_grads(model, tp)
        return {"logits": by_token, "loss": float(totals[0] / totals[1]), "grads": grads}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    (out,) = run_distributed(_worker, 1, 1, 1, False, False)
    return out


@pytest.mark.parametrize(
    ("world", "tp", "cp", "sp"),
    [(1, 1, 1, False), (2, 1, 2, False), (2, 2, 1, True), (4, 2, 2, True)],
    ids=["thd", "thd-cp2", "thd-tp2-sp", "thd-tp2-sp-cp2"],
)
def test_thd_equals_the_dense_masked_path(
    reference: dict[str, Any], world: int, tp: int, cp: int, sp: bool
) -> None:
    outs = run_distributed(_worker, world, tp, cp, sp, True, timeout=300)
    logits: dict[tuple[int, int], torch.Tensor] = {}
    for out in outs:
        logits.update(out["logits"])
    assert set(logits) == set(reference["logits"]) == {(d, o) for d, n in enumerate(DOCS) for o in range(n)}
    worst = max(float((logits[k] - reference["logits"][k]).abs().max()) for k in logits)
    scale = max(float(v.abs().max()) for v in reference["logits"].values())
    assert worst <= 1e-5 * scale, (worst, scale)
    assert outs[0]["loss"] == pytest.approx(reference["loss"], rel=1e-6)
    # fp32: max |difference| within 1e-5 of the tensor's largest entry (seen: <= 4e-6).
    for name, expected in reference["grads"].items():
        diff = float((outs[0]["grads"][name] - expected).abs().max())
        assert diff <= 1e-5 * float(expected.abs().max()), (name, diff)


def _seed_weights_by_global_name(model: torch.nn.Module) -> None:
    """Every parameter from a generator seeded by its *global* name (layer numbers across pipeline
    stages), so any pipeline split holds the same model."""
    import zlib

    layers = {str(i): str(layer.layer_number - 1) for i, layer in enumerate(model.decoder.layers)}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = layers[parts[2]]
        gen = torch.Generator().manual_seed(zlib.crc32(".".join(parts).encode()))
        norm = "norm" in name
        with torch.no_grad():
            param.copy_(torch.randn(param.shape, generator=gen) * (0.05 if norm else 0.3) + norm)


def _score_worker(rank: int, world: int, store_path: str, pp: int, thd: bool) -> list[Any]:
    """Score every row of the store through score's own path (micro-batches, Megatron's
    forward-only pipeline schedule, the scoring math), dense or THD, at PP = ``pp``."""
    from helpers.thd_reference import thd_layer_spec
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from nemo_dcod.data.store import PackedStore
    from nemo_dcod.model.families import build_gpt_config
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode
    from nemo_dcod.score.core import score_micro_batches
    from nemo_dcod.score.ranks import micro_batches_of

    enable_cpu_mode()
    parallel_state.initialize_model_parallel(1, pp, create_gloo_process_groups=False)
    try:
        model_parallel_cuda_manual_seed(1234)
        store = PackedStore(store_path)
        config = build_gpt_config(
            "llama3.1",
            "tiny",
            padded_vocab_size=256,
            seq_length=store.seq_length,
            parallel={"pipeline_model_parallel_size": pp, "pipeline_dtype": torch.float32},
            precision={},
        )
        config.deallocate_pipeline_outputs = False
        if thd:
            config.transformer_layer_spec = thd_layer_spec
        model = config.configure_model(None).eval()
        _seed_weights_by_global_name(model)
        rows = range(len(store) - len(store) % 2)
        batches = micro_batches_of(store, rows, 2, "cpu", thd=thd)  # 2 rows per micro-batch
        return score_micro_batches(model, batches, vocab_size=209, topk=3)
    finally:
        parallel_state.destroy_model_parallel()


def test_score_packs_rows_as_thd_at_pp1_and_pp2(tmp_path: Any) -> None:
    """Score's THD path (a micro-batch's rows as one packed sequence of B·S tokens, the schedule's
    buffers sized for it) gives the dense path's columns, at one and two pipeline stages."""
    from helpers.trace_fixtures import prepare_store

    store = prepare_store(tmp_path, 64, 209)
    (dense,) = run_distributed(_score_worker, 1, store, 1, False)
    for pp in (1, 2):
        got = run_distributed(_score_worker, pp, store, pp, True, timeout=300)[-1]  # the last stage
        assert len(got) == len(dense) > 1
        for a, b in zip(got, dense, strict=True):
            assert float((a.logprobs - b.logprobs).abs().max()) < 1e-4
            assert torch.equal(a.topk_ids, b.topk_ids)
            assert float((a.topk_logprobs - b.topk_logprobs).abs().max()) < 1e-4
