"""Batches for training: the synthetic trace source, and the packed sample store made by ``prepare``.

* :mod:`~nemo_dcod.data.readers` (JSONL / Parquet / saved HF datasets -> validated traces),
  :mod:`~nemo_dcod.data.tokenize` (chat template, assistant-only mask, teacher log-probs, length
  policy, answer filter), :mod:`~nemo_dcod.data.store` (packing, the sharded store, the
  :class:`~nemo_dcod.data.store.PackedStore` dataset), :mod:`~nemo_dcod.data.prepare` (the stage).
* :mod:`~nemo_dcod.data.synthetic`: a Markov teacher in the same batch format.

Training from a store (not wired yet; what the wiring needs): a data module like
``SyntheticTraceDataModule`` whose ``train_ds`` is ``PackedStore(path)``; ``data.seq_length`` and
``data.vocab_size`` taken from (or checked against) the manifest's ``seq_length`` and
``vocab_size``; a loss that reads teacher log-probs only when ``manifest["columns"]
["teacher_logprobs"]`` is set (top-k only after ``score``). Packed rows need document-aware
attention: ``collate_fn=functools.partial(collate_packed, attention_mask=True)`` gives Megatron's
local attention the ``[B, 1, S, S]`` mask (the unfused softmax, as on CPU, applies it; the fused
upper-triangular kernel on GPU ignores any mask, so GPU runs use Transformer Engine with
``PackedSeqParams`` from :func:`~nemo_dcod.data.store.cu_seqlens`, THD layout).
"""
