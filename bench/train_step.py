"""CPU benchmark: training throughput (tokens/s) of DisCorD against SFT, through ``nemo-dcod train``.

What it measures: whole optimizer steps of the NeMo training loop that ``nemo-dcod train`` runs
(``run_train``: ``MegatronStrategy``, DDP, Megatron's Adam with clipping, the metrics callback),
with the tiny Llama 3.1 student (4 layers, width 64, local layer spec, fp32) and a realistic
vocabulary (``V=32000``), ``S=512`` tokens per sample, 8 samples per step in 2 micro-batches.
The figure is ``tokens_per_s`` of ``metrics.jsonl`` (sequence tokens of a step / the wall time
between the ends of two consecutive steps), per step, for

* ``sft``: ``loss.name=sft``, plain cross-entropy on the traces;
* ``discord``: ``loss.name=discord``, ``variant=token``, ``base=ce`` (λ = 1 from the first step).

Why one process, alternating per step. On a shared 2-core machine the background load changes
on a scale of seconds, and a NeMo process takes ~20 s to start: separate runs (or runs taken in
turn, A/B/A/B) would see different loads, and their ratio moves by more than the 3% being
checked. Here one training run switches its loss *every step*, in ABBA order (sft, discord,
discord, sft, ...), so that both losses see the same load, the same warm caches and allocator
state, and any linear drift cancels within each block of four. The model's loss reduction is
replaced by one that dispatches to the two real ``DistillLossReduction`` objects the model builds
for each loss config (``training_loss_reduction``), and marks each step's record with the loss it
used. Both losses share everything else (model, optimizer, data, DisCorD's teacher fields are in
every batch anyway). The first ABBA block is a warm-up and is dropped; each loss's figure is the
median over its remaining steps and the ratio is that of the medians. Printed as well, to show the
noise: in brackets the ratio of the fastest steps (least disturbed by other processes), and
the ratio within each ABBA block.

Why the teacher vocabulary is smaller than the student's. The synthetic teacher is a dense
``V x V`` Markov chain: at ``V=32000`` it would take 4 GB per dataset (and ~20 GB while it is
built). The student and the loss use ``data.vocab_size=32000`` (no padding at TP=1); the traces
come from a chain over the first 4096 ids, which costs the loss exactly the same (the
vocabulary-wide work does not depend on which ids are labels). Four global batches of samples are
generated before training and repeated, so that the timed steps hold no Python sampling loop.

Why this size. With width 64 the output layer and the loss take a *larger* share of a step than in
a real model (where the transformer layers dominate), so DisCorD's extra per-token work shows
more here than it would at scale: a conservative test of the ratio.

Threads: torch's default (one per core). The load average is printed.

Run from the repository root: ``.venv/bin/python bench/train_step.py`` (44 steps of ~2 s plus
~30 s of start-up on 2 idle cores, estimated from ``--quick``; ``--quick``: a smoke test with
S=128, 4 samples per step, 12 steps, ~1 min). The last line is
``RESULT tokens_per_s_ratio=<x>`` (DisCorD / SFT; target >= 0.97).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Importing torch imports torch.cuda, which warns that pynvml is deprecated: not ours to fix.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TARGET = 0.97  # DisCorD tokens/s / SFT tokens/s
LOSSES = ("sft", "discord")
MARKER = "bench_discord"  # in each step's metrics record: 1.0 when DisCorD ran it, 0.0 for SFT
BLOCK = 4  # one ABBA block of steps; the first one is the warm-up
DISTINCT_BATCHES = 4  # global batches of distinct samples, repeated over the run


def loss_of_step(step: int) -> str:
    """The loss of 0-based step ``step``: ABBA blocks, sft, discord, discord, sft, sft, ..."""
    first = (step // 2) % 2  # 0: sft first in this pair, 1: discord first
    return LOSSES[(step % 2) ^ first]


@dataclass
class Config:
    """Problem size and step counts, shared by the orchestrator and its worker.

    Attributes:
        vocab: the student's vocabulary (``data.vocab_size``).
        teacher_vocab: ids the synthetic teacher chain emits (at most ``vocab``).
        seq: tokens per sample (``data.seq_length``).
        global_batch: samples per optimizer step.
        micro_batch: samples per forward pass.
        blocks: timed ABBA blocks of 4 steps, after one warm-up block.
    """

    vocab: int
    teacher_vocab: int
    seq: int
    global_batch: int
    micro_batch: int
    blocks: int

    @property
    def steps(self) -> int:
        """Optimizer steps of the run (the warm-up block included)."""
        return BLOCK * (self.blocks + 1)

    def as_args(self) -> list[str]:
        """The command-line flags that give the worker this configuration."""
        return [
            f"--vocab={self.vocab}",
            f"--teacher-vocab={self.teacher_vocab}",
            f"--seq={self.seq}",
            f"--global-batch={self.global_batch}",
            f"--micro-batch={self.micro_batch}",
            f"--blocks={self.blocks}",
        ]

    def overrides(self, run_dir: Path) -> list[str]:
        """``nemo-dcod train`` overrides of the run (the loss is switched per step on top)."""
        return [
            f"run_dir={run_dir}",
            "resume=false",
            "model.family=llama3.1",
            "model.size=tiny",
            "model.spec=local",
            f"data.vocab_size={self.vocab}",
            f"data.seq_length={self.seq}",
            "data.topk=4",
            f"trainer.global_batch_size={self.global_batch}",
            f"trainer.micro_batch_size={self.micro_batch}",
            f"trainer.max_steps={self.steps}",
            f"trainer.ckpt_every_n_steps={self.steps}",  # one save, after the last timed step
            "trainer.save_top_k=1",
            "loss.name=discord",
            "loss.variant=token",
            "loss.base=ce",
        ]


# ----------------------------------------------------------------------------------------------
# Worker side: one NeMo training run that switches its loss every step.
# ----------------------------------------------------------------------------------------------


def _alternating_reduction(model: Any, cfg: Any) -> Any:
    """A loss reduction that runs ``loss_of_step(step)``'s reduction of ``model`` at each step.

    Each inner reduction is the model's own ``training_loss_reduction`` built for that loss
    config; the outer one forwards to it and copies what the metrics callback reads.
    """
    from nemo.lightning.megatron_parallel import MegatronLossReduction

    discord = cfg.loss if cfg.loss.get("name") == "discord" else {"name": "discord"}
    configs = {"sft": {"name": "sft"}, "discord": dict(discord)}
    inner = {}
    for name, section in configs.items():
        model.loss_settings = section
        model._training_loss_reduction = None  # the property builds it again from loss_settings
        inner[name] = model.training_loss_reduction
    model.loss_settings = dict(cfg.loss)
    step_fn: Callable[[], int] = inner["discord"].step_fn  # the trainer's global step, 0-based

    class Alternating(MegatronLossReduction):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.last_loss: float | None = None
            self.last_metrics: dict[str, float] = {}
            self.last_weight_hist: Any = None

        def forward(self, batch: Any, forward_out: Any) -> Any:
            return inner[loss_of_step(step_fn())].forward(batch, forward_out)

        def reduce(self, losses_reduced_per_micro_batch: Any) -> Any:
            name = loss_of_step(step_fn())
            current = inner[name]
            out = current.reduce(losses_reduced_per_micro_batch)
            self.last_loss, self.last_weight_hist = current.last_loss, current.last_weight_hist
            self.last_metrics = {**current.last_metrics, MARKER: float(name == "discord")}
            return out

    return Alternating()


def _worker_main(cfg: Config, run_dir: Path) -> None:
    """Train through ``run_train`` with two seams replaced: the model's loss, and the data."""
    import torch

    from nemo_dcod.config import load_config
    from nemo_dcod.data.synthetic import SyntheticTraceDataModule
    from nemo_dcod.train import run as train_run
    from nemo_dcod.train.config import TrainConfig

    train_cfg = load_config(TrainConfig, None, cfg.overrides(run_dir))
    build_model = train_run.build_model

    def build_model_alternating(c: TrainConfig, seq_length: int | None = None) -> Any:
        model = build_model(c, seq_length=seq_length)
        model._training_loss_reduction = _alternating_reduction(model, c)
        return model

    def pregenerated_data(c: TrainConfig, layout: Any = None) -> Any:
        t, d = c.trainer, c.data
        data = SyntheticTraceDataModule(
            vocab_size=cfg.teacher_vocab,
            seq_length=d.seq_length,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=t.global_batch_size,
            num_train_samples=t.max_steps * t.global_batch_size,
            num_val_samples=1,
            topk=d.topk,
            seed=d.seed,
        )
        # A few global batches' worth of distinct samples, repeated: the timed steps hold no Python
        # sampling loop, and the cost of a step does not depend on the values. One thread, because
        # the chain's many tiny ops only wait for each other's threads on a busy machine.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        distinct = [
            data.train_ds[i] for i in range(min(len(data.train_ds), DISTINCT_BATCHES * t.global_batch_size))
        ]
        torch.set_num_threads(threads)
        data.train_ds = [
            distinct[i % len(distinct)] for i in range(len(data.train_ds))
        ]  # a list is a Dataset
        return data

    train_run.build_model = build_model_alternating
    train_run._data_module = pregenerated_data
    train_run.run_train(train_cfg)


# ----------------------------------------------------------------------------------------------
# Orchestrator side: runs the worker, reads metrics.jsonl, prints.
# ----------------------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=10, method="inclusive")
    return f"{q[0] * 1e3:7.0f} {statistics.median(values) * 1e3:7.0f} {q[-1] * 1e3:7.0f}"


def _report(cfg: Config, records: list[dict[str, Any]], quick: bool) -> float:
    """Print the table; return DisCorD's median tokens/s over SFT's."""
    by_loss: dict[str, list[dict[str, Any]]] = {name: [] for name in LOSSES}
    for r in records:
        name = loss_of_step(int(r["step"]) - 1)
        if r.get(MARKER) != float(name == "discord"):
            raise RuntimeError(f"step {r['step']}: expected {name}, the record says otherwise: {r}")
        if r["step"] > BLOCK:  # the first block is the warm-up
            by_loss[name].append(r)
    tokens_per_step = cfg.global_batch * cfg.seq
    print(f"{'loss':<8} {'steps':>5} {'tokens/s':>9}   step time ms: p10     p50     p90   loss first→last")
    median, fastest = {}, {}
    for name in LOSSES:
        rs = by_loss[name]
        speeds = [float(r["tokens_per_s"]) for r in rs]
        median[name], fastest[name] = statistics.median(speeds), max(speeds)
        times = [tokens_per_step / s for s in speeds]
        print(
            f"{name:<8} {len(rs):>5} {median[name]:>9.0f}   {'':>13}{_percentiles(times)}   "
            f"{rs[0]['loss']:.3f}→{rs[-1]['loss']:.3f}"
        )
    blocks = []  # per block: SFT's time over DisCorD's (2 steps each) = DisCorD's relative tokens/s
    for start in range(BLOCK + 1, cfg.steps + 1, BLOCK):
        time_of = dict.fromkeys(LOSSES, 0.0)
        for r in records:
            if start <= r["step"] < start + BLOCK:
                time_of[loss_of_step(r["step"] - 1)] += tokens_per_step / r["tokens_per_s"]
        blocks.append(time_of["sft"] / time_of["discord"])
    ratio = median["discord"] / median["sft"]
    spread = f"median {statistics.median(blocks):.3f}, min {min(blocks):.3f}, max {max(blocks):.3f}"
    print(
        f"ratio DisCorD / SFT tokens/s: medians {ratio:.3f} [fastest steps "
        f"{fastest['discord'] / fastest['sft']:.3f}]; per ABBA block: {spread}"
    )
    verdict = "met" if ratio >= TARGET else "MISSED"
    note = " (--quick: too few steps to judge)" if quick else ""
    print(f"target: tokens/s ratio {ratio:.3f} >= {TARGET}: {verdict}{note}")
    return ratio


def _parse() -> tuple[argparse.Namespace, Config]:
    """Command-line flags, and the configuration they give."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: S=128, 4 samples per step, 12 steps"
    )
    parser.add_argument("--vocab", type=int, default=32000, help="student vocabulary V (data.vocab_size)")
    parser.add_argument("--teacher-vocab", type=int, default=4096, help="ids of the synthetic teacher chain")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sample (default 512; quick: 128)")
    parser.add_argument(
        "--global-batch", type=int, default=None, help="samples per step (default 8; quick: 4)"
    )
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="samples per forward (default 4; quick: 2)"
    )
    parser.add_argument("--blocks", type=int, default=None, help="timed ABBA blocks (default 10; quick: 2)")
    parser.add_argument("--keep", type=Path, default=None, help="run directory to keep (default: a temp dir)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # its run directory
    args = parser.parse_args()
    quick = args.quick

    def pick(value: int | None, full: int, smoke: int) -> int:
        return value if value is not None else (smoke if quick else full)

    cfg = Config(
        vocab=args.vocab,
        teacher_vocab=min(args.teacher_vocab, args.vocab),
        seq=pick(args.seq, 512, 128),
        global_batch=pick(args.global_batch, 8, 4),
        micro_batch=pick(args.micro_batch, 4, 2),
        blocks=pick(args.blocks, 10, 2),
    )
    return args, cfg


def main() -> None:
    """Run the benchmark, or (with the internal ``--worker`` flag) its training process."""
    args, cfg = _parse()
    if args.worker is not None:
        _worker_main(cfg, args.worker)
        return
    start = time.perf_counter()
    print(
        f"bench/train_step.py: llama3.1 tiny, V={cfg.vocab} (teacher chain {cfg.teacher_vocab} ids), "
        f"S={cfg.seq}, {cfg.global_batch} samples/step in micro-batches of {cfg.micro_batch}, "
        f"{cfg.steps} steps (first {BLOCK} warm-up), loss switched per step (ABBA); "
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        run_dir = (args.keep or Path(tmp) / "run").resolve()
        log_path = Path(tmp) / "worker.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker={run_dir}", *cfg.as_args()]
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        with log_path.open("wb") as log:
            returncode = subprocess.run(
                cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT
            ).returncode
        metrics = run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if returncode != 0 or len(records) != cfg.steps:
            sys.stderr.write(log_path.read_text(errors="replace")[-6000:])
            raise RuntimeError(f"training run failed (exit {returncode}, {len(records)}/{cfg.steps} steps)")
    ratio = _report(cfg, records, args.quick)
    print(f"load average after: {os.getloadavg()[0]:.1f}; (bench took {time.perf_counter() - start:.0f} s)")
    print(f"RESULT tokens_per_s_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
