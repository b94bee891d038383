"""A synthetic trace source in the final batch format, for tests, benchmarks and smoke runs.

The teacher is a random Markov chain over ``vocab_size`` tokens (a dense table up to 4096 tokens,
rank-32 logits above) whose transition probabilities are known exactly, so every field ``score``
writes for a real teacher is exact here: the trace token's log-prob and the top-k (ids,
log-probs). Sample ``i`` depends only on ``(seed, i)``: any rank, any data-parallel layout and a
resumed run see the same data.

Batch fields (per sample, collated to ``[B, S]`` / ``[B, S, K]``), as the packed store will give them:
``tokens``, ``labels`` (next tokens), ``position_ids``, ``loss_mask`` (0 on the prompt),
``segment_ids`` (one document per row), ``teacher_logprobs``, ``teacher_topk_ids``,
``teacher_topk_logprobs``.
"""

from __future__ import annotations

import torch
from nemo.lightning import io
from torch.utils.data import Dataset

from nemo_dcod.data.module import MegatronSampledDataModule

__all__ = ["DENSE_MAX_VOCAB", "SyntheticTraceDataModule", "SyntheticTraces"]

DENSE_MAX_VOCAB = 4096
"""Up to this vocabulary the teacher chain is a dense table; above it, low-rank logits."""


class SyntheticTraces(Dataset[dict[str, torch.Tensor]]):
    """Traces of a random Markov teacher with exact per-token log-probs and top-k.

    Args:
        vocab_size: tokens of the teacher chain (the tokenizer's real size).
        seq_length: tokens per sample.
        num_samples: length of the dataset.
        topk: teacher top-k stored per token (0: none).
        prompt_tokens: leading tokens with loss mask 0.
        seed: the teacher chain and the samples.
        sharpness: scale of the random transition logits (larger: more deterministic teacher).
    """

    def __init__(
        self,
        vocab_size: int,
        seq_length: int,
        num_samples: int,
        topk: int = 4,
        prompt_tokens: int = 4,
        seed: int = 0,
        sharpness: float = 2.5,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.topk = topk
        self.prompt_tokens = min(prompt_tokens, seq_length - 1)
        self.seed = seed
        self.transitions: torch.Tensor | None = None
        if vocab_size <= DENSE_MAX_VOCAB:
            logits = sharpness * torch.randn(vocab_size, vocab_size, generator=gen)
            self.transitions = torch.log_softmax(logits.double(), dim=-1).float()  # [V, V]
            self.probs = self.transitions.exp()  # once, not per sampled token
        else:
            # A dense V x V chain is V² floats (4 GB at 32k): use logits of rank r instead,
            # sharpness * A[prev] @ B^T / sqrt(r), rows computed when a sample is made.
            rank = 32
            self.factor_a = torch.randn(vocab_size, rank, generator=gen) * (sharpness / rank**0.5)
            self.factor_b = torch.randn(vocab_size, rank, generator=gen)

    def _rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[N, V]`` log transition probabilities from each of ``tokens``."""
        if self.transitions is not None:
            return self.transitions[tokens]
        return torch.log_softmax((self.factor_a[tokens] @ self.factor_b.T).double(), dim=-1).float()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 7919 * int(index) + 1)
        chain = torch.empty(self.seq_length + 1, dtype=torch.long)
        chain[0] = int(torch.randint(0, self.vocab_size, (1,), generator=gen))
        for t in range(self.seq_length):
            probs = (
                self.probs[chain[t]]
                if self.transitions is not None
                else self._rows(chain[t : t + 1])[0].exp()
            )
            chain[t + 1] = int(torch.multinomial(probs, 1, generator=gen))
        tokens, labels = chain[:-1], chain[1:]
        rows = self._rows(tokens)  # [S, V]
        loss_mask = torch.ones(self.seq_length, dtype=torch.float32)
        loss_mask[: self.prompt_tokens] = 0.0
        sample = {
            "tokens": tokens,
            "labels": labels,
            "position_ids": torch.arange(self.seq_length, dtype=torch.long),
            "loss_mask": loss_mask,
            "segment_ids": torch.zeros(self.seq_length, dtype=torch.long),
            "teacher_logprobs": rows.gather(-1, labels[:, None])[:, 0],
        }
        if self.topk:
            top = rows.topk(self.topk, dim=-1)
            sample["teacher_topk_ids"] = top.indices
            sample["teacher_topk_logprobs"] = top.values
        return sample


class SyntheticTraceDataModule(MegatronSampledDataModule, io.IOMixin):
    """Training and validation batches from :class:`SyntheticTraces` (validation: another seed)."""

    def __init__(
        self,
        vocab_size: int,
        seq_length: int,
        micro_batch_size: int,
        global_batch_size: int,
        num_train_samples: int,
        num_val_samples: int = 0,
        topk: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__(seq_length, micro_batch_size, global_batch_size)
        self.train_ds = SyntheticTraces(vocab_size, seq_length, num_train_samples, topk=topk, seed=seed)
        self.val_ds = SyntheticTraces(
            vocab_size, seq_length, max(num_val_samples, 1), topk=topk, seed=seed + 1
        )
