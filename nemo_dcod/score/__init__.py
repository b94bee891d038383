"""``nemo-dcod score``: a model's per-token log-probs (and top-k) of the traces, into the store.

* :mod:`~nemo_dcod.score.config` - the stage's schema;
* :mod:`~nemo_dcod.score.core` - vocab-parallel logits -> teacher columns, forward-only schedule;
* :mod:`~nemo_dcod.score.run` - checks, resumable per-shard writing, ranks, the manifest.
"""
