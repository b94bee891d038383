"""Call megatron-core 0.15.3's three ``np.product`` sites and check their results.

    python tests/helpers/np_product_probe.py [--drop] [--no-shim]

``--drop`` deletes ``numpy.product`` first (numpy 1 still has it; numpy 2 does not), ``--no-shim``
skips ``import nemo_dcod`` (whose import applies :func:`nemo_dcod.parallel.numpy_compat.
restore_np_product`). Prints one line per site and ``np_product_probe: ok`` or the first error;
exits 0 only if all three ran and gave the right numbers. Run by tests/unit/test_numpy_compat.py
(numpy 1, the attribute dropped) and by scripts/gpu_sim.sh (the GPU image's numpy 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--drop", action="store_true", help="delete numpy.product first")
    parser.add_argument("--no-shim", action="store_true", help="do not import nemo_dcod")
    args = parser.parse_args()

    import numpy as np

    if args.drop and "product" in vars(np):
        del np.product  # type: ignore[attr-defined]
    if not args.no_shim:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        import nemo_dcod  # noqa: F401 - applies the shim

    import torch
    from megatron.core.dist_checkpointing.exchange_utils import _shard_size
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.validation import _validate_sharding_for_key_flattened

    print(f"numpy {np.__version__}, np.product {'present' if hasattr(np, 'product') else 'missing'}")
    try:
        # The fully parallel save's split of shards among DP ranks: bytes of a [6, 4] fp32 shard.
        whole = ShardedTensor.from_rank_offsets("w", torch.zeros(6, 4), replica_id=0)
        size = _shard_size(whole)
        print(f"exchange_utils._shard_size: {size}")
        if size != 6 * 4 * 4:
            raise AssertionError(f"_shard_size gave {size}, expected 96")
        # The distributed optimizer's flattened shards: elements 5..13 of a [3, 5] tensor.
        flat = ShardedTensor.from_rank_offsets_flat(
            "w", torch.zeros(8), (3, 5), flattened_range=slice(5, 13), replica_id=0
        )
        rows, cols = flat.local_coordinates()
        print(f"mapping.local_coordinates: rows {rows.tolist()} cols {cols.tolist()}")
        if (rows * 5 + cols).tolist() != list(range(5, 13)):
            raise AssertionError("local_coordinates do not cover elements 5..12")
        # Two flattened pieces that cover the 15 elements, then two that leave a gap.
        pieces = [
            ShardedTensor.from_rank_offsets_flat(
                "w", torch.zeros(b - a), (3, 5), flattened_range=slice(a, b), replica_id=0
            )
            for a, b in ((0, 7), (7, 15))
        ]
        _validate_sharding_for_key_flattened(pieces)
        gap = [
            pieces[0],
            ShardedTensor.from_rank_offsets_flat("w", torch.zeros(7), (3, 5), flattened_range=slice(8, 15)),
        ]
        try:
            _validate_sharding_for_key_flattened(gap)
        except Exception as exc:  # megatron's CheckpointingException: the gap is found
            if type(exc).__name__ != "CheckpointingException":
                raise
            print("validation._validate_sharding_for_key_flattened: covering pieces pass, a gap is refused")
        else:
            raise AssertionError("a flattened shard with a gap passed validation")
    except Exception as exc:
        print(f"np_product_probe: FAILED: {type(exc).__name__}: {exc}")
        return 1
    print("np_product_probe: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
