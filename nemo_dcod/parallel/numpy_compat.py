"""``np.product`` for megatron-core 0.15.3 under numpy 2.

megatron-core 0.15.3 pins ``numpy<2`` but runs on numpy 2 (the lent GPU machine's image has
numpy 2.5 and keeps it), except where its distributed checkpointing calls ``np.product``, which
numpy 2.0 removed (``np.prod`` is the same function; megatron-core 0.16 switched to it):

* ``dist_checkpointing.exchange_utils._shard_size``: the fully parallel save/load's split of the
  shards among data-parallel ranks (NeMo's default ``ckpt_parallel_save``), i.e. every checkpoint
  save at DP > 1;
* ``dist_checkpointing.mapping.ShardedTensor.local_coordinates`` and
  ``dist_checkpointing.validation._validate_sharding_for_key_flattened``: flattened shards, i.e.
  the distributed optimizer's state.

:func:`restore_np_product` puts ``np.product = np.prod`` back when numpy lacks it. It is applied
when ``nemo_dcod`` is imported (its ``__init__``), which every process of ours does before it
builds a model, so before any checkpoint is saved or loaded. It adds a name numpy 2 no longer
has and changes nothing else: under numpy 1 (which still has ``np.product``) it does nothing.
"""

from __future__ import annotations

import numpy as np

__all__ = ["restore_np_product"]


def restore_np_product() -> bool:
    """Define ``numpy.product`` as ``numpy.prod`` if numpy lacks it (numpy >= 2).

    Returns:
        True if it was missing and is now defined, False if numpy already had it.
    """
    if hasattr(np, "product"):  # numpy 2's module __getattr__ raises AttributeError for it
        return False
    np.product = np.prod  # type: ignore[attr-defined]
    return True
