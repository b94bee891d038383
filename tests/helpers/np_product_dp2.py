"""Save a checkpoint at DP=2 through megatron-core's fully parallel strategy, load it (CPU, gloo).

    python tests/helpers/np_product_dp2.py DIR [--drop] [--no-shim]

What NeMo's ``MegatronStrategy`` does at every checkpoint save and load at DP > 1 on GPUs
(``ckpt_parallel_save`` / ``ckpt_parallel_load``, on by default there; our CPU runs turn them off):
``FullyParallelSaveStrategyWrapper`` spreads the replicated tensors' writes over the
data-parallel ranks, sizing each shard with ``exchange_utils._shard_size`` (``np.product`` in
megatron-core 0.15.3); ``FullyParallelLoadStrategyWrapper`` sizes the reads with the same function
(its exchange needs CUDA: loaded back here with the plain strategy).
Two processes, each holding the same two tensors (replicas 0 and 1), save to DIR and load back;
every rank checks the loaded values. ``--drop`` deletes ``numpy.product`` before ``import
nemo_dcod`` (numpy 1 still has it; the import puts it back), ``--no-shim`` deletes it after that
import (numpy 2 without the shim). Prints one line per rank and ``np_product_dp2: ok``, or the
first error; exits 0 only if both ranks loaded the right values. Run by
tests/distributed/test_gpu_sim.py (numpy 1) and scripts/gpu_sim.sh (the image's numpy 2).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")  # one write: the two ranks' lines do not interleave
    sys.stdout.flush()


def _rank(directory: Path, drop: bool, shim: bool) -> int:
    import numpy as np

    if drop and "product" in vars(np):
        del np.product  # type: ignore[attr-defined]
    sys.path.insert(0, str(ROOT))
    # Importing nemo_dcod applies the shim; enable_cpu_mode: megatron's checkpoint writer calls
    # torch.cuda.synchronize() (nemo_dcod/parallel/cpu_mode.py), as in our CPU training.
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode

    enable_cpu_mode()
    if not shim and "product" in vars(np):
        del np.product  # type: ignore[attr-defined] - the shim undone: numpy 2 as it is
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        expected = {
            "weight": torch.arange(24, dtype=torch.float32).reshape(6, 4),
            "bias": torch.linspace(-1, 1, 10),
        }

        def sharded(tensors: dict[str, torch.Tensor]) -> dict[str, ShardedTensor]:
            # The same whole tensor on both ranks: data-parallel replicas 0 and 1.
            return {k: ShardedTensor.from_rank_offsets(k, v, replica_id=rank) for k, v in tensors.items()}

        save = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy())
        dist_checkpointing.save(sharded(expected), str(directory), sharded_strategy=save)
        dist.barrier()
        # Loaded back with the plain strategy: the fully parallel load's exchange puts tensors on
        # 'cuda' (exchange_utils), and its np.product call is the same _shard_size as the save's.
        empty = {k: torch.zeros_like(v) for k, v in expected.items()}
        loaded = dist_checkpointing.load(sharded(empty), str(directory))
        for name, value in expected.items():
            if not torch.equal(loaded[name], value):
                raise AssertionError(f"rank {rank}: {name} loaded {loaded[name]} != saved {value}")
        files = sorted(p.name for p in directory.iterdir() if p.suffix == ".distcp")
        _say(f"np_product_dp2: rank {rank}: fully parallel save ({', '.join(files)}), load: 2 tensors ok")
        return 0
    except Exception as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        last = ([f for f in frames if "megatron" in f.filename] or frames)[-1]
        where = f"{last.filename}:{last.lineno}"
        _say(f"np_product_dp2: rank {rank}: FAILED: {type(exc).__name__}: {exc} (at {where})")
        return 1
    finally:
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("dir", type=Path, help="checkpoint directory (created; must not exist)")
    parser.add_argument("--drop", action="store_true", help="delete numpy.product first")
    parser.add_argument(
        "--no-shim", action="store_true", help="delete numpy.product after importing nemo_dcod"
    )
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        return _rank(args.dir, args.drop, not args.no_shim)

    args.dir.mkdir(parents=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    flags = [*(["--drop"] if args.drop else []), *(["--no-shim"] if args.no_shim else [])]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(args.dir), *flags, "--rank", str(rank)],
            env={**env, "RANK": str(rank)},
        )
        for rank in range(2)
    ]
    codes = [proc.wait(timeout=540) for proc in procs]
    ok = codes == [0, 0]
    print(f"np_product_dp2: {'ok' if ok else f'FAILED (exit codes {codes})'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
