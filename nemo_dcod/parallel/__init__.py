"""Tensor-parallel building blocks: vocab-parallel log-prob ops (and, later, the CPU mode)."""

from nemo_dcod.parallel.vocab_parallel import (
    VocabParallelOutput,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_target_logprobs,
    vocab_parallel_topk_forward_kl,
)

__all__ = [
    "VocabParallelOutput",
    "vocab_parallel_entropy",
    "vocab_parallel_logprobs",
    "vocab_parallel_target_logprobs",
    "vocab_parallel_topk_forward_kl",
]
