"""Batches for training: the synthetic trace source, and the packed sample store made by ``prepare``.

* :mod:`~nemo_dcod.data.readers` (JSONL / Parquet / saved HF datasets -> validated traces),
  :mod:`~nemo_dcod.data.tokenize` (chat template, assistant-only mask, teacher log-probs, length
  policy, answer filter), :mod:`~nemo_dcod.data.store` (packing, the sharded store, the
  :class:`~nemo_dcod.data.store.PackedStore` dataset), :mod:`~nemo_dcod.data.prepare` (the stage).
* :mod:`~nemo_dcod.data.synthetic`: a Markov teacher in the same batch format.

Training from a store: :class:`~nemo_dcod.data.module.StoreTraceDataModule` serves
``PackedStore`` rows with the attention the layers need (:mod:`~nemo_dcod.data.thd`: THD
metadata for Transformer Engine, the dense block-diagonal mask for the local layers, plain causal
for one document per row); :mod:`~nemo_dcod.data.plan` and :mod:`~nemo_dcod.data.dry_run` are
the pre-flight's view of a store (its manifest, or a plan of one made later).
"""
