"""GPU benchmark: training throughput, MFU and peak memory of ``nemo-dcod train``, DisCorD vs SFT.

What it measures: whole optimizer steps of the training loop ``nemo-dcod train`` runs
(``run_train``: NeMo's ``MegatronStrategy``, Megatron's optimizer, the metrics callback), for a
Llama-shaped student (default ``llama3.2`` ``1b``: 16 layers, width 2048, ~1.2B parameters) in
bf16 on a packed store (``--store``, made by ``nemo-dcod prepare``), one GPU. Like
``bench/train_step.py`` (read its docstring for why), one run switches its loss every step in ABBA
order (sft, discord, discord, sft, ...) through the model's own two loss reductions, the first
block is a warm-up, and each loss's figure is the median ``tokens_per_s`` of its steps in
``metrics.jsonl``. Printed:

* **tokens/s/GPU** (all steps after the warm-up; one GPU, so per GPU);
* **MFU**: model FLOPs per second over the card's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`, the
  vendor's figure without sparsity). Model FLOPs per token are PaLM's (Chowdhery et al. 2022,
  App. B): ``6·N + 12·L·h·s`` (forward + backward of every matmul weight, N of them, plus the
  attention scores and their weighted sum over the ``s`` positions, counted as full, not causal,
  by that convention), with N the weights a token multiplies: every transformer layer, the final
  norm and the output layer (once, tied or not; the input embedding is a lookup);
* **peak memory**: ``torch.cuda.max_memory_allocated`` of the training process against the
  estimate of ``nemo-dcod train --dry-run`` (``nemo_dcod.train.memory.train_estimate`` on the
  built model's config);
* **DisCorD / SFT tokens/s** from the same run.

Targets (printed, met or not): DisCorD/SFT >= 0.97; peak memory within ±20% of the estimate.
Without CUDA it prints ``skipped: no GPU`` and exits 0, without a RESULT line. ``--smoke``: a tiny
model on the synthetic teacher, fp32, on whatever device there is (CPU here), a few steps: the
plumbing, marked ``gpu=cpu-smoke`` (no peak memory or MFU on CPU: ``nan``).

Run (the GPU check does): ``python bench/train_gpu.py --store STORE --vocab 128256 --keep RUN``.
Last line: ``RESULT gpu=<name> tokens_per_s_gpu=<x> mfu=<y> discord_over_sft=<z> mem_over_estimate=<w>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore", message="The pynvml package is deprecated")

REPO_ROOT = Path(__file__).resolve().parents[1]
for where in (REPO_ROOT, REPO_ROOT / "bench"):
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))

from train_step import BLOCK, MARKER, _alternating_reduction, loss_of_step  # noqa: E402

SPEED_TARGET = 0.97  # DisCorD tokens/s over SFT's
MEMORY_TOLERANCE = 0.20  # |peak / estimate - 1|
STATS_FILE = "bench_train_gpu.json"  # written by the worker into the run directory

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets; the first
# entry whose key is in torch.cuda.get_device_name() wins, so specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (HBM3)
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The card's dense bf16 peak in FLOP/s, or None for a card not in :data:`PEAK_BF16_TFLOPS`."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in device_name:
            return tflops * 1e12
    return None


def model_flops_per_token(matmul_params: int, num_layers: int, hidden_size: int, seq_length: int) -> float:
    """PaLM's model FLOPs per trained token (App. B): ``6·N + 12·L·h·s``."""
    return 6.0 * matmul_params + 12.0 * num_layers * hidden_size * seq_length


def matmul_parameters(arch: Any) -> int:
    """N of :func:`model_flops_per_token` for a ``nemo_dcod.train.memory.Architecture``: every
    layer, the final norm, the output layer once (tied or not); not the input embedding."""
    norm = arch.hidden_size * (2 if arch.layernorm_has_bias else 1)
    output = arch.padded_vocab_size * arch.hidden_size
    return int(arch.num_layers * arch.layer_parameters(1) + norm + output)


def overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """``nemo-dcod train`` overrides of the benchmark run (the loss is switched per step on top)."""
    steps = BLOCK * (args.blocks + 1)
    common = [
        f"run_dir={run_dir}",
        "resume=false",
        f"trainer.max_steps={steps}",
        f"trainer.ckpt_every_n_steps={steps}",  # one save, after the last timed step
        "trainer.save_top_k=1",
        "trainer.val_check_interval=0",
        f"trainer.global_batch_size={args.global_batch}",
        f"trainer.micro_batch_size={args.micro_batch}",
        "trainer.devices=1",
        "optim.warmup_steps=1",
        "loss.name=discord",
        "loss.variant=token",
        "loss.base=ce",
    ]
    if args.smoke:
        return [
            *common,
            "model.family=llama3.1",
            "model.size=tiny",
            "model.spec=local",
            "precision.dtype=fp32",
            "data.source=synthetic",
            "data.vocab_size=512",
            f"data.seq_length={args.seq}",
        ]
    return [
        *common,
        f"model.family={args.family}",
        f"model.size={args.size}",
        f"model.spec={args.spec}",
        "precision.dtype=bf16",
        *([f"precision.fp8={args.fp8}"] if args.fp8 else []),
        "data.source=store",
        f"data.path={args.store}",
        f"data.vocab_size={args.vocab}",
        f"data.seq_length={args.seq}",
    ]


def _worker_main(args: argparse.Namespace, run_dir: Path) -> None:
    """``run_train`` with the model's loss reduction switched per step; writes what it measured."""
    import torch

    from nemo_dcod.config import load_config
    from nemo_dcod.train import run as train_run
    from nemo_dcod.train.config import TrainConfig
    from nemo_dcod.train.memory import Architecture, train_estimate

    cfg = load_config(TrainConfig, None, overrides(args, run_dir))
    build_model = train_run.build_model
    built: dict[str, Any] = {}

    def build_model_alternating(c: TrainConfig, *a: Any, **kw: Any) -> Any:
        model = build_model(c, *a, **kw)
        model._training_loss_reduction = _alternating_reduction(model, c)
        built["config"] = model.config
        return model

    train_run.build_model = build_model_alternating
    train_run.run_train(cfg)
    cuda = torch.cuda.is_available()
    arch = Architecture.of(built["config"])
    te = cfg.uses_transformer_engine(cuda)
    layout = train_run.store_layout(cfg, te) if cfg.data.source == "store" else None
    estimate = train_estimate(cfg, built["config"], layout.attention if layout else None, te)
    stats = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
        "estimate": estimate.total,
        "estimate_text": estimate.describe(),
        "matmul_params": matmul_parameters(arch),
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "seq_length": cfg.data.seq_length,
        "tokens_per_step": cfg.trainer.global_batch_size * cfg.data.seq_length,
    }
    (run_dir / STATS_FILE).write_text(json.dumps(stats, indent=1))


def summarize(records: list[dict[str, Any]], stats: dict[str, Any]) -> dict[str, float]:
    """The figures of a run from its ``metrics.jsonl`` records and the worker's stats.

    Raises:
        RuntimeError: a step whose record does not carry the loss the ABBA order gave it.
    """
    speeds: dict[str, list[float]] = {"sft": [], "discord": []}
    for r in records:
        name = loss_of_step(int(r["step"]) - 1)
        if r.get(MARKER) != float(name == "discord"):
            raise RuntimeError(f"step {r['step']}: expected {name}, the record says otherwise: {r}")
        if r["step"] > BLOCK and r.get("tokens_per_s"):
            speeds[name].append(float(r["tokens_per_s"]))
    if not speeds["sft"] or not speeds["discord"]:
        raise RuntimeError(f"no timed steps after the warm-up block of {BLOCK}: {len(records)} records")
    tokens_per_s = statistics.median(speeds["sft"] + speeds["discord"])
    peak = peak_bf16_flops(stats["device"])
    flops = model_flops_per_token(
        stats["matmul_params"], stats["num_layers"], stats["hidden_size"], stats["seq_length"]
    )
    allocated = stats.get("peak_allocated")
    return {
        "tokens_per_s_gpu": tokens_per_s,
        "sft": statistics.median(speeds["sft"]),
        "discord": statistics.median(speeds["discord"]),
        "discord_over_sft": statistics.median(speeds["discord"]) / statistics.median(speeds["sft"]),
        "model_tflops": tokens_per_s * flops / 1e12,
        "mfu": tokens_per_s * flops / peak if peak else math.nan,
        "mem_over_estimate": allocated / stats["estimate"] if allocated else math.nan,
    }


def report(figures: dict[str, float], stats: dict[str, Any], smoke: bool) -> str:
    """Print the table and the verdicts; return the RESULT line."""
    gib = 1024**3
    print(f"device: {stats['device']}; {stats['estimate_text']}")
    print(f"{'loss':<8} {'tokens/s':>10}")
    for name in ("sft", "discord"):
        print(f"{name:<8} {figures[name]:>10.0f}")
    peak = peak_bf16_flops(stats["device"])
    print(
        f"tokens/s/GPU {figures['tokens_per_s_gpu']:.0f}; model {figures['model_tflops']:.1f} TFLOP/s "
        f"({stats['matmul_params'] / 1e9:.2f}B matmul weights, 6N + 12·L·h·s per token) = MFU "
        f"{figures['mfu']:.3f}"
        + (f" of {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else " (card not in the peak table)")
    )
    ratio, mem = figures["discord_over_sft"], figures["mem_over_estimate"]
    note = " (smoke: too few steps to judge)" if smoke else ""
    print(
        f"target: DisCorD/SFT tokens/s {ratio:.3f} >= {SPEED_TARGET}: {_verdict(ratio >= SPEED_TARGET)}{note}"
    )
    if math.isnan(mem):
        print("target: peak memory vs estimate: not measured (no CUDA)")
    else:
        print(
            f"target: peak memory {stats['peak_allocated'] / gib:.1f} GiB / estimate "
            f"{stats['estimate'] / gib:.1f} GiB = {mem:.3f} within ±{MEMORY_TOLERANCE:.0%}: "
            f"{_verdict(abs(mem - 1) <= MEMORY_TOLERANCE)}"
        )
    gpu = "cpu-smoke" if smoke else stats["device"].replace("NVIDIA ", "").replace(" ", "_")
    return (
        f"RESULT gpu={gpu} tokens_per_s_gpu={figures['tokens_per_s_gpu']:.0f} mfu={figures['mfu']:.3f} "
        f"discord_over_sft={ratio:.3f} mem_over_estimate={mem:.3f}"
    )


def _without_keep(argv: list[str]) -> list[str]:
    """``argv`` without ``--keep DIR`` / ``--keep=DIR`` (the worker gets its run directory itself)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--keep":
            skip = True
        elif not arg.startswith("--keep="):
            out.append(arg)
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model, synthetic data, few steps, any device"
    )
    parser.add_argument("--store", type=Path, help="packed store of `nemo-dcod prepare` (not with --smoke)")
    parser.add_argument("--vocab", type=int, default=128256, help="the store's vocabulary (data.vocab_size)")
    parser.add_argument("--seq", type=int, default=None, help="row length (default 4096; smoke: 64)")
    parser.add_argument("--family", default="llama3.2", help="model.family")
    parser.add_argument("--size", default="1b", help="model.size")
    parser.add_argument("--spec", default="local", help="model.spec: local | te")
    parser.add_argument("--fp8", default=None, help="precision.fp8 (hybrid | e4m3; needs --spec te)")
    parser.add_argument(
        "--global-batch", type=int, default=None, help="samples per step (default 4; smoke 2)"
    )
    parser.add_argument("--micro-batch", type=int, default=1, help="samples per forward")
    parser.add_argument("--blocks", type=int, default=None, help="timed ABBA blocks (default 2; smoke 1)")
    parser.add_argument("--keep", type=Path, default=None, help="run directory to keep (default: a temp dir)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq = args.seq or (64 if args.smoke else 4096)
    args.global_batch = args.global_batch or (2 if args.smoke else 4)
    args.blocks = args.blocks or (1 if args.smoke else 2)
    if not args.smoke and args.store is None and args.worker is None:
        parser.error("--store is needed (a store of `nemo-dcod prepare` with --seq-token rows), or --smoke")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with the internal ``--worker``, its training process); 0 on success."""
    args = _parse(argv)
    if args.worker is not None:
        _worker_main(args, args.worker)
        return 0
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench/train_gpu.py: skipped: no GPU (CUDA is not available); --smoke runs a tiny CPU version")
        return 0
    start = time.perf_counter()
    what = "tiny llama3.1 on the synthetic teacher, fp32" if args.smoke else f"{args.family} {args.size} bf16"
    print(
        f"bench/train_gpu.py: {what}, S={args.seq}, {args.global_batch} samples/step in micro-batches "
        f"of {args.micro_batch}, {BLOCK * (args.blocks + 1)} steps (first {BLOCK} warm-up), loss "
        "switched per step (ABBA)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench_train_gpu_") as tmp:
        run_dir = (args.keep or Path(tmp) / "run").resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = Path(tmp) / "worker.log"  # the run directory is emptied when the run starts
        forwarded = _without_keep(argv if argv is not None else sys.argv[1:])
        cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker={run_dir}", *forwarded]
        with log_path.open("wb") as log:
            code = subprocess.run(
                cmd, env=dict(os.environ, PYTHONWARNINGS="ignore"), stdout=log, stderr=subprocess.STDOUT
            ).returncode
        metrics, stats_path = run_dir / "metrics.jsonl", run_dir / STATS_FILE
        records = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if code != 0 or not stats_path.exists():
            sys.stderr.write(log_path.read_text(errors="replace")[-6000:])
            print(f"bench/train_gpu.py: the training run failed (exit {code}, {len(records)} steps)")
            return 1
        stats = json.loads(stats_path.read_text())
        if args.keep:
            (run_dir / "worker.log").write_bytes(log_path.read_bytes())
    line = report(summarize(records, stats), stats, args.smoke)
    print(f"(bench took {time.perf_counter() - start:.0f} s)")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
