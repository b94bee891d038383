"""Single-rank checks of the vocab-parallel ops against full-vocabulary float64 references.

The multi-rank (TP = 2, 4) equivalence lives in tests/distributed/test_vocab_parallel_tp.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers.references import entropy, forward_kl_buckets, full_logprobs, tail_logprob
from torch.utils._python_dispatch import TorchDispatchMode

from nemo_dcod.parallel import (
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_target_logprobs,
    vocab_parallel_topk_forward_kl,
)

ROWS, VOCAB, K = 11, 19, 4


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(ROWS, VOCAB, generator=gen, dtype=torch.float64)).to(dtype)
    ids = torch.stack([torch.randperm(VOCAB - 4, generator=gen)[: K + 1] for _ in range(ROWS)])
    return logits.requires_grad_(), ids


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 100])
@pytest.mark.parametrize("vocab_size", [VOCAB, VOCAB - 4])
@pytest.mark.parametrize("tail_from", [0, 1])
def test_values_and_gradients_match_full_softmax(chunk_size, vocab_size, tail_from) -> None:
    logits, ids = _inputs()
    out = vocab_parallel_logprobs(
        logits,
        ids,
        vocab_size=vocab_size,
        with_tail=True,
        with_entropy=True,
        tail_from=tail_from,
        chunk_size=chunk_size,
    )
    ref_logits = logits.detach().clone().requires_grad_()
    lp = full_logprobs(ref_logits, vocab_size)
    ref = (lp.gather(-1, ids), tail_logprob(lp, ids[:, tail_from:]), entropy(lp))
    for got, want in zip((out.logprobs, out.tail_logprobs, out.entropy), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in ref]
    got_grad = torch.autograd.grad(
        sum(
            (w * t).sum()
            for w, t in zip(weights, (out.logprobs, out.tail_logprobs, out.entropy), strict=True)
        ),
        logits,
    )[0]
    want_grad = torch.autograd.grad(
        sum((w * t).sum() for w, t in zip(weights, ref, strict=True)), ref_logits
    )[0]
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-12)
    assert torch.all(got_grad[:, vocab_size:] == 0), "padded columns must get zero gradient"


def test_wrappers_match_references() -> None:
    logits, ids = _inputs(seed=3)
    lp = full_logprobs(logits.detach(), VOCAB)
    target = ids[:, 0]
    torch.testing.assert_close(
        vocab_parallel_target_logprobs(logits, target),
        lp.gather(-1, target[:, None])[:, 0],
        rtol=1e-12,
        atol=0,
    )
    torch.testing.assert_close(vocab_parallel_entropy(logits), entropy(lp), rtol=1e-12, atol=1e-12)
    teacher_lp = torch.log_softmax(torch.randn(ROWS, VOCAB, dtype=torch.float64), -1).gather(-1, ids)
    kl = vocab_parallel_topk_forward_kl(logits, ids, teacher_lp)
    for r in range(ROWS):
        want = forward_kl_buckets(
            teacher_lp[r].exp().tolist(),
            lp[r].gather(0, ids[r]).exp().tolist(),
            float(tail_logprob(lp[r], ids[r]).exp()),
        )
        assert abs(float(kl[r]) - want) < 1e-12
    assert torch.all(kl >= -1e-12)


def test_leading_dims_are_flattened_and_input_is_untouched() -> None:
    logits, ids = _inputs(seed=5)
    logits3 = logits.detach().reshape(1, ROWS, VOCAB).clone()
    before = logits3.clone()
    out = vocab_parallel_logprobs(logits3, ids.reshape(1, ROWS, -1))
    assert out.logprobs.shape == (1, ROWS, K + 1)
    assert torch.equal(logits3, before)


def test_bf16_logits_compute_in_fp32_and_return_bf16_grad() -> None:
    logits64, ids = _inputs(seed=7)
    logits = logits64.detach().to(torch.bfloat16).requires_grad_()
    out = vocab_parallel_target_logprobs(logits, ids[:, 0], chunk_size=4)
    assert out.dtype == torch.float32
    ref = full_logprobs(logits.detach().double(), VOCAB).gather(-1, ids[:, :1])[:, 0]
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert grad.dtype == torch.bfloat16


class _LargestFloat32(TorchDispatchMode):
    """Records the largest fp32 tensor any aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("with_extras", [False, True])
def test_chunking_never_materialises_a_full_fp32_shard(with_extras: bool) -> None:
    rows, vocab, chunk = 64, 512, 8
    logits = torch.randn(rows, vocab, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, vocab, (rows, 3))
    with _LargestFloat32() as probe:
        out = vocab_parallel_logprobs(
            logits, ids, with_tail=with_extras, with_entropy=with_extras, chunk_size=chunk
        )
        total = out.logprobs.sum()
        if with_extras:
            assert out.tail_logprobs is not None and out.entropy is not None
            total = total + out.tail_logprobs.sum() + out.entropy.sum()
        total.backward()
    assert logits.grad is not None
    assert probe.largest <= chunk * vocab, f"an fp32 tensor of {probe.largest} elements was created"
    # Unchunked, the fp32 softmax of the whole shard is kept: the probe must see it (test can fail).
    with _LargestFloat32() as probe_full:
        vocab_parallel_logprobs(logits, ids).logprobs.sum().backward()
    assert probe_full.largest >= rows * vocab


def test_second_backward_unchunked_raises_chunked_works() -> None:
    logits, ids = _inputs()
    out = vocab_parallel_target_logprobs(logits, ids[:, 0])
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.sum().backward()
    logits.grad = None
    out = vocab_parallel_target_logprobs(logits, ids[:, 0], chunk_size=2)
    out.sum().backward(retain_graph=True)
    first = logits.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(logits.grad, 2 * first)


def test_bad_inputs_raise_clear_errors() -> None:
    logits, ids = _inputs()
    with pytest.raises(ValueError, match=r"ids: shape \(3, 5\) does not match logits \(11, 19\)"):
        vocab_parallel_logprobs(logits, ids[:3])
    bad = ids.clone()
    bad[4, 2] = VOCAB + 7
    bad[6, 0] = -1
    with pytest.raises(
        ValueError, match=r"ids: 2 token id\(s\) outside the vocabulary \[0, 19\); first at index \(4, 2\)"
    ):
        vocab_parallel_logprobs(logits, bad)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 15\)"):
        vocab_parallel_logprobs(logits, torch.full_like(ids, 16), vocab_size=15)
    with pytest.raises(ValueError, match="chunk_size=0"):
        vocab_parallel_logprobs(logits, ids, chunk_size=0)
    with pytest.raises(ValueError, match="vocab_size=20"):
        vocab_parallel_logprobs(logits, ids, vocab_size=20)
    with pytest.raises(ValueError, match="must be int32/int64"):
        vocab_parallel_logprobs(logits, ids.double())


def test_out_of_range_ids_under_the_mask_are_ignored() -> None:
    logits, ids = _inputs()
    target = ids[:, 0].clone()
    target[2] = -100  # the usual "ignore" label on prompt/padding tokens
    mask = torch.ones(ROWS, dtype=torch.bool)
    mask[2] = False
    out = vocab_parallel_target_logprobs(logits, target, mask=mask)
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(torch.where(mask, out, 0.0).sum(), logits)
    assert torch.all(grad[2] == 0) and torch.isfinite(grad).all()
