"""A reference THD core attention in plain torch, for testing the packed-row path without a GPU.

Transformer Engine's ``TEDotProductAttention`` is the only megatron-core attention that takes
``PackedSeqParams`` (THD), and it needs CUDA. This module stands in for it, with the same call
signature, inside a *real* megatron-core ``GPTModel`` (the local layer spec with its core
attention swapped): so the plug-in's data step, forward step, ``PackedSeqParams``, megatron-core's
THD handling (the squeeze to ``[T, heads, dim]``, per-sequence RoPE from ``cu_seqlens``) and the
context-parallel partition run for real on CPU, and only the kernel is ours.

What it computes is what TE's fused attention computes on THD: causal softmax attention within
each sequence of ``cu_seqlens_q_padded`` (or ``cu_seqlens_q``), over its first ``cu_seqlens_q``
length of real tokens (padding positions are keys of no one). Under context parallelism each rank
holds its balanced chunks of every sequence; keys and values are all-gathered from the
context-parallel group (a differentiable all-gather sends the gradient back to their owner)
together with their global positions, instead of TE's ring exchange: slow, exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from nemo_dcod.data.thd import cp_partition_index

__all__ = ["ReferenceTHDAttention", "thd_layer_spec"]


class _AllGather(torch.autograd.Function):
    """Concatenate a tensor from every rank of ``group`` along dim 0; backward: each rank's slice
    of the summed gradient (``torch.distributed.nn``'s own backward scatters from global rank 0,
    which fails in a group without it on gloo)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group, ctx.size = group, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad[rank * ctx.size : (rank + 1) * ctx.size], None


class ReferenceTHDAttention(torch.nn.Module):
    """Drop-in for megatron-core's core attention that understands ``PackedSeqParams`` (THD)."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, **kwargs: Any) -> None:
        super().__init__()
        del layer_number, attn_mask_type, kwargs
        self.config = config
        self.heads = config.num_attention_heads // config.tensor_model_parallel_size
        self.groups = config.num_query_groups // config.tensor_model_parallel_size
        self.dim = config.kv_channels

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> Tensor:
        """``[T, heads, dim]`` THD inputs -> ``[T, heads x dim]`` (megatron reshapes it to ``[T, 1, H]``)."""
        del attention_mask, attn_mask_type, attention_bias
        if packed_seq_params is None:
            raise AssertionError("ReferenceTHDAttention is for THD batches only")
        from megatron.core import parallel_state

        cu = packed_seq_params.cu_seqlens_q.long()
        padded = packed_seq_params.cu_seqlens_q_padded
        offsets = (padded if padded is not None else packed_seq_params.cu_seqlens_q).long()
        cp = parallel_state.get_context_parallel_world_size()
        rank = parallel_state.get_context_parallel_rank()
        total = int(offsets[-1])
        if cp > 1:
            group = parallel_state.get_context_parallel_group()
            keys = _AllGather.apply(key, group)
            values = _AllGather.apply(value, group)
            key_pos = torch.cat([cp_partition_index(offsets, cp, r) for r in range(cp)])
            query_pos = cp_partition_index(offsets, cp, rank)
        else:
            keys, values = key, value
            key_pos = query_pos = torch.arange(total)
        seq_of = torch.bucketize(torch.arange(total), offsets[1:], right=True)
        within = torch.arange(total) - offsets[seq_of]
        real = within < (cu[1:] - cu[:-1])[seq_of]
        qs, ks = seq_of[query_pos], seq_of[key_pos]
        allowed = (
            (qs[:, None] == ks[None, :]) & (key_pos[None, :] <= query_pos[:, None]) & real[key_pos][None]
        )
        allowed |= key_pos[None, :] == query_pos[:, None]  # a padding query sees itself (no NaN)
        repeat = self.heads // self.groups
        k = keys.repeat_interleave(repeat, dim=1)  # [Tk, heads, dim]
        v = values.repeat_interleave(repeat, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query.float(), k.float()) / math.sqrt(self.dim)
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.float()).to(query.dtype)
        return out.reshape(out.shape[0], -1)


def thd_layer_spec(config: Any) -> Any:
    """megatron-core's local GPT layer spec with :class:`ReferenceTHDAttention` as core attention."""
    from nemo.collections.llm.gpt.model.base import local_layer_spec

    spec = local_layer_spec(config)
    spec.submodules.self_attention.submodules.core_attention = ReferenceTHDAttention
    return spec
