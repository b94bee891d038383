"""CPU benchmark: our vocab-parallel log-prob and DisCorD loss against Megatron-core's cross-entropy.

What it measures, at tensor-parallel sizes TP=1 and TP=2 (two processes on the gloo backend),
for a micro-batch of ``B=1`` sequence of ``S=2048`` tokens over a ``V=32768`` vocabulary:

* **Time** of forward + backward (median over repetitions, after a warm-up) of

  - the baseline, ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (``.sum()``),
  - ``-vocab_parallel_target_logprobs(...).sum()``: the same quantity, our implementation,
  - the full DisCorD loss, ``loss_from_logits(build_loss("discord"), ...)``,

  unchunked, and chunked (``chunk_size`` rows at a time), as ratios against Megatron. The
  variants run round-robin (so that drift and background load hit all alike); for TP=2 each
  repetition counts the slower rank. In brackets: the same from the fastest repetition of each,
  less sensitive to other processes on a shared machine (the load average is printed); the
  targets and the RESULT line use the medians.
* **Peak extra memory** on bf16 logits: the resident memory on top of the inputs. Each variant
  runs in a fresh process per rank with ``MALLOC_MMAP_THRESHOLD_=65536``, so every large buffer is
  mmapped and handed back to the OS when freed. A tiny run first does the lazy initialisation;
  then the inputs are allocated and touched, the current RSS (``/proc/self/statm``) is the base,
  and the peak is ``ru_maxrss - base`` after one forward + backward (a warning is printed if
  anything before the base peaked higher). For TP=2 it is the maximum over the ranks. Memory
  processes do not import Megatron unless they measure it (their TP group is then the world
  group), and run several at a time: peak RSS does not depend on the CPU contention.

Why bf16 logits. A bf16 model's output layer produces bf16 logits, so they are the primary input;
Megatron's cross-entropy then makes an fp32 copy (``.float()``) to work on, which is the time and
memory a real run pays. fp32 logits are a secondary timing line.

Why the input is cloned. On fp32 input ``.float()`` is a no-op and Megatron's cross-entropy works
*in place*: it overwrites its input with ``exp(x - max)``, then the softmax, and reuses that
buffer as the gradient. Every repetition therefore gets a fresh clone of the logits, made outside
the timed region, for every variant alike. Gradients are taken with ``torch.autograd.grad``, so
no ``.grad`` accumulation (which may copy) is timed or counted: in a model the gradient goes
straight into the output layer's backward.

Megatron on CPU. ``initialize_model_parallel`` (after ``init_process_group("gloo")``) and
``vocab_parallel_cross_entropy`` run on CPU as they are in megatron-core 0.15.3: no workaround.

Threads: ``torch.set_num_threads(2)`` at TP=1 and 1 per process at TP=2 (2 cores).

Run from the repository root: ``.venv/bin/python bench/loss.py`` (``--quick``: a smoke test with
S=256). The last line is ``RESULT discord_time_ratio=<x> chunked_mem_ratio=<y>``: the worst (max)
over the TP sizes; the chunked memory ratio is the worse of the target log-prob and DisCorD.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# Importing torch imports torch.cuda, which warns that pynvml is deprecated: not ours to fix.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import Tensor  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TIME_TARGET = 1.10  # unchunked DisCorD fwd+bwd time / Megatron CE fwd+bwd time, bf16
MEM_TARGET = 0.5  # chunked peak extra memory / Megatron CE peak extra memory, bf16
TP_SIZES = (1, 2)
MIB = 1024.0 * 1024.0
TAG = "BENCHJSON "  # a worker's result line; the rest of its output (warnings) is ignored
MAX_MEM_PROCS = 4  # memory-measuring processes alive at once

# Measured variants: name -> (loss kind, chunked).
VARIANTS: dict[str, tuple[str, bool]] = {
    "megatron": ("megatron", False),
    "target": ("target", False),
    "discord": ("discord", False),
    "target_chunked": ("target", True),
    "discord_chunked": ("discord", True),
}
FP32_VARIANTS = ("megatron", "target", "discord")


@dataclass
class Config:
    """Problem size and repetition counts, shared by the orchestrator and its workers.

    Attributes:
        seq: sequence length S (tokens per row).
        batch: micro-batch size B.
        vocab: vocabulary size V, split evenly over the TP ranks (no padding).
        chunk: rows per chunk of the chunked variants.
        reps: timed repetitions per variant.
        warmup: untimed repetitions per variant before them.
    """

    seq: int
    batch: int
    vocab: int
    chunk: int
    reps: int
    warmup: int

    def as_args(self) -> list[str]:
        """The command-line flags that give a worker this configuration."""
        return [
            f"--seq={self.seq}",
            f"--batch={self.batch}",
            f"--vocab={self.vocab}",
            f"--chunk={self.chunk}",
            f"--reps={self.reps}",
            f"--warmup={self.warmup}",
        ]


# ----------------------------------------------------------------------------------------------
# Worker side: one process per TP rank.
# ----------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """One rank's inputs: ``logits`` ``[B, S, V/TP]`` (Megatron gets the ``[S, B, V/TP]`` view)
    and the DisCorD batch (``labels``, ``loss_mask``, ``teacher_logprobs``, all ``[B, S]``)."""

    logits: Tensor
    batch: dict[str, Tensor]


def _rss_bytes() -> int:
    """Current resident set size of this process, from ``/proc/self/statm``."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _setup(tp: int, rank: int, port: int, *, megatron: bool, threads: int) -> Any:
    """Start gloo (and Megatron's parallel state); return the tensor-parallel group.

    Args:
        tp: tensor-parallel size (= world size).
        rank: this process's rank.
        port: the rendezvous port on 127.0.0.1.
        megatron: initialise Megatron's global parallel state and use its TP group; otherwise
            the world group (the same ranks) and Megatron is never imported.
        threads: ``torch.set_num_threads`` for this process.
    """
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    if not megatron:
        return dist.group.WORLD
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy  # noqa: F401 (import first)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return parallel_state.get_tensor_model_parallel_group()


def _make_inputs(cfg: Config, tp: int, rank: int, dtype: torch.dtype, seq: int | None = None) -> Inputs:
    """Random logits for this rank's shard, written row by row (no full-size temporary), and a batch.

    Labels, loss mask and teacher log-probs are the same on every rank; the logit shards differ.
    """
    seq = cfg.seq if seq is None else seq
    gen = torch.Generator().manual_seed(1234)
    labels = torch.randint(0, cfg.vocab, (cfg.batch, seq), generator=gen)
    loss_mask = torch.ones(cfg.batch, seq)
    loss_mask[:, : seq // 8] = 0.0  # a prompt, not trained on
    teacher_logprobs = -torch.rand(cfg.batch, seq, generator=gen) * 8.0
    logits = torch.empty(cfg.batch, seq, cfg.vocab // tp, dtype=dtype)
    gen_logits = torch.Generator().manual_seed(4321 + rank)
    for row in range(seq):
        logits[:, row].normal_(0.0, 2.0, generator=gen_logits)
    batch = {"labels": labels, "loss_mask": loss_mask, "teacher_logprobs": teacher_logprobs}
    return Inputs(logits=logits, batch=batch)


def _loss_fn(
    kind: str, chunk: int | None, inputs: Inputs, group: Any, vocab: int
) -> Callable[[Tensor], Tensor]:
    """The scalar whose forward + backward is measured, as a function of the logits.

    Args:
        kind: ``megatron`` (CE sum), ``target`` (-Σ log q(label)) or ``discord`` (its loss_sum).
        chunk: rows per chunk (ours only); None: unchunked.
        inputs: the batch (labels, mask, teacher log-probs) the loss reads.
        group: the tensor-parallel group.
        vocab: the real vocabulary size.
    """
    labels = inputs.batch["labels"]
    if kind == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        target_sb = labels.transpose(0, 1)

        def megatron(x: Tensor) -> Tensor:
            return vocab_parallel_cross_entropy(x.transpose(0, 1), target_sb).sum()

        return megatron

    from nemo_dcod.losses import LossContext, build_loss
    from nemo_dcod.parallel.loss_inputs import loss_from_logits
    from nemo_dcod.parallel.vocab_parallel import vocab_parallel_target_logprobs

    if kind == "target":

        def target(x: Tensor) -> Tensor:
            lp = vocab_parallel_target_logprobs(x, labels, group=group, vocab_size=vocab, chunk_size=chunk)
            return -lp.sum()

        return target

    loss, ctx = build_loss("discord"), LossContext(dp_group=None)
    batch: Any = inputs.batch  # a TraceBatch

    def discord(x: Tensor) -> Tensor:
        loss_sum, _, _ = loss_from_logits(
            loss, x, batch, ctx, tp_group=group, vocab_size=vocab, chunk_size=chunk
        )
        return loss_sum

    return discord


def _fwd_bwd(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Forward + backward of ``fn`` at ``x``; returns the gradient."""
    (grad,) = torch.autograd.grad(fn(x), x)
    return grad


def _check(cfg: Config, inputs: Inputs, group: Any, tp: int) -> dict[str, float]:
    """Our -Σ log q(label) and its gradient against Megatron's CE, on fp32 copies of the logits."""
    base = inputs.logits.float()
    values: dict[str, float] = {}
    grads: dict[str, Tensor] = {}
    for name in ("megatron", "target", "target_chunked"):
        kind, chunked = VARIANTS[name]
        fn = _loss_fn(kind, cfg.chunk if chunked else None, inputs, group, cfg.vocab)
        x = base.clone().requires_grad_(True)
        value = fn(x)
        (grads[name],) = torch.autograd.grad(value, x)
        values[name] = float(value)
    out = {}
    for name in ("target", "target_chunked"):
        diff = (grads[name] - grads["megatron"]).abs().max()
        if tp > 1:
            dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=group)
        out[f"grad_{name}"] = float(diff)
        out[f"loss_{name}"] = abs(values[name] / values["megatron"] - 1.0)
    return out


def _profile(inputs: Inputs, group: Any, cfg: Config) -> str:
    """torch.profiler tables (self CPU time) of one fwd+bwd of Megatron's CE and unchunked DisCorD."""
    from torch.profiler import ProfilerActivity, profile

    tables = []
    for name in ("megatron", "discord"):
        fn = _loss_fn(VARIANTS[name][0], None, inputs, group, cfg.vocab)
        x = inputs.logits.clone().requires_grad_(True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _fwd_bwd(fn, x)
        del x
        averages = prof.key_averages()
        table = averages.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40)
        tables.append(f"--- profile: {name}, one fwd+bwd (TP=1, bf16, S={cfg.seq}) ---\n{table}")
    return "\n".join(tables)


def _time_worker(cfg: Config, tp: int, rank: int, port: int) -> dict[str, Any]:
    """Per-repetition times of every variant on bf16 and fp32 logits (plus checks, a profile)."""
    group = _setup(tp, rank, port, megatron=True, threads=max(1, (os.cpu_count() or 2) // tp))
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    for dtype_name, dtype, names in (
        ("bf16", torch.bfloat16, tuple(VARIANTS)),
        ("fp32", torch.float32, FP32_VARIANTS),
    ):
        inputs = _make_inputs(cfg, tp, rank, dtype)
        if dtype == torch.bfloat16:
            out["check"] = _check(cfg, inputs, group, tp)
        fns = {}
        for name in names:
            kind, chunked = VARIANTS[name]
            fns[name] = _loss_fn(kind, cfg.chunk if chunked else None, inputs, group, cfg.vocab)
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(cfg.warmup + cfg.reps):
            for name in names:
                x = inputs.logits.clone().requires_grad_(True)  # Megatron destroys fp32 input
                if tp > 1:
                    dist.barrier(group=group)
                start = time.perf_counter()
                grad = _fwd_bwd(fns[name], x)
                elapsed = time.perf_counter() - start
                del grad, x
                if rep >= cfg.warmup:
                    times[name].append(elapsed)
        out[dtype_name] = times
        if dtype == torch.bfloat16 and tp == 1:
            out["profile"] = _profile(inputs, group, cfg)
        del inputs, fns
    return out


def _mem_worker(cfg: Config, tp: int, rank: int, port: int, variant: str) -> dict[str, int]:
    """Peak extra RSS of one fwd+bwd of ``variant`` on bf16 logits, in this fresh process."""
    kind, chunked = VARIANTS[variant]
    group = _setup(tp, rank, port, megatron=kind == "megatron", threads=1)
    # A tiny run first: lazy imports and initialisation happen before the base is read.
    small = _make_inputs(cfg, tp, rank, torch.bfloat16, seq=16)
    _fwd_bwd(_loss_fn(kind, 4 if chunked else None, small, group, cfg.vocab), small.logits.requires_grad_())
    del small
    inputs = _make_inputs(cfg, tp, rank, torch.bfloat16)
    fn = _loss_fn(kind, cfg.chunk if chunked else None, inputs, group, cfg.vocab)
    x = inputs.logits.requires_grad_(True)
    if tp > 1:
        dist.barrier(group=group)
    base = _rss_bytes()
    before = _max_rss_bytes()
    grad = _fwd_bwd(fn, x)
    peak = _max_rss_bytes()
    del grad
    return {"extra": peak - base, "slack": max(0, before - base)}


def _worker_main(args: argparse.Namespace, cfg: Config) -> None:
    """Entry point of a worker process: prints its result as one tagged JSON line."""
    if args.worker == "time":
        result: Any = _time_worker(cfg, args.tp, args.rank, args.port)
    else:
        result = _mem_worker(cfg, args.tp, args.rank, args.port, args.variant)
    print(TAG + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Orchestrator side: starts the workers, aggregates and prints.
# ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """The ``tp`` worker processes (one per rank) of one measurement, and their output files."""

    name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    outputs: list[IO[bytes]] = field(default_factory=list)

    def done(self) -> bool:
        """Whether every rank has exited."""
        return all(p.poll() is not None for p in self.procs)

    def results(self) -> list[Any]:
        """Each rank's result (waits for them); raises with the worker's output on a failure."""
        results = []
        for rank, (proc, output) in enumerate(zip(self.procs, self.outputs, strict=True)):
            returncode = proc.wait(timeout=600)
            output.seek(0)
            text = output.read().decode(errors="replace")
            output.close()
            tagged = [line[len(TAG) :] for line in text.splitlines() if line.startswith(TAG)]
            if returncode != 0 or not tagged:
                sys.stderr.write(text)
                raise RuntimeError(f"worker {self.name} rank {rank} failed (exit code {returncode})")
            results.append(json.loads(tagged[-1]))
        return results


def _start(cfg: Config, tp: int, worker: str, variant: str = "") -> Job:
    """Start the ``tp`` ranks of one worker job (memory jobs with ``MALLOC_MMAP_THRESHOLD_``)."""
    from nemo_dcod.parallel.launch import free_port

    port = free_port()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if worker == "mem":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    job = Job(name=f"{worker} {variant} TP={tp}")
    for rank in range(tp):
        cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker={worker}", f"--tp={tp}"]
        cmd += [f"--rank={rank}", f"--port={port}", f"--variant={variant or 'megatron'}", *cfg.as_args()]
        output = tempfile.TemporaryFile()  # noqa: SIM115 (read and closed by Job.results)
        proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT)
        job.procs.append(proc)
        job.outputs.append(output)
    return job


def _measure_memory(cfg: Config) -> dict[int, dict[str, int]]:
    """Peak extra bytes (max over ranks) of every variant at every TP size, a few jobs at a time."""
    pending = [(tp, name) for tp in TP_SIZES for name in VARIANTS]
    running: list[tuple[int, str, Job]] = []
    peaks: dict[int, dict[str, int]] = {tp: {} for tp in TP_SIZES}
    while pending or running:
        while pending and sum(tp for tp, _, _ in running) + pending[0][0] <= MAX_MEM_PROCS:
            tp, name = pending.pop(0)
            running.append((tp, name, _start(cfg, tp, "mem", name)))
        finished = [item for item in running if item[2].done()]
        if not finished:
            time.sleep(0.2)
        for tp, name, job in finished:
            running.remove((tp, name, job))
            ranks = job.results()
            peaks[tp][name] = max(r["extra"] for r in ranks)
            slack = max(r["slack"] for r in ranks)
            if slack > 8 * MIB:
                print(f"warning: {name} TP={tp}: RSS peaked {slack / MIB:.1f} MiB over the base before it")
    return peaks


def _over_ranks(per_rank: list[dict[str, Any]], dtype_name: str, name: str) -> tuple[float, float]:
    """Median and minimum over repetitions of the slowest rank's time in each repetition."""
    reps = [max(rep) for rep in zip(*(r[dtype_name][name] for r in per_rank), strict=True)]
    return statistics.median(reps), min(reps)


def _report(cfg: Config, tp: int, timing: list[dict[str, Any]], mem: dict[str, int]) -> dict[str, float]:
    """Print one TP size's lines; return its DisCorD time ratio and worst chunked memory ratio."""
    stats = {d: {n: _over_ranks(timing, d, n) for n in timing[0][d]} for d in ("bf16", "fp32")}
    med = {d: {n: v[0] for n, v in per.items()} for d, per in stats.items()}

    def ratio(d: str, n: str) -> float:
        return med[d][n] / med[d]["megatron"]

    def both(d: str, n: str) -> str:
        # Median ratio, and in brackets the ratio of the fastest repetitions (less background noise).
        return f"{ratio(d, n):.3f}x [{stats[d][n][1] / stats[d]['megatron'][1]:.3f}x]"

    def mratio(n: str) -> float:
        return mem[n] / mem["megatron"]

    check, threads = timing[0]["check"], timing[0]["threads"]
    shard_mib = cfg.batch * cfg.seq * (cfg.vocab // tp) * 2 / MIB
    print(f"TP={tp}: {tp} process(es) x {threads} thread(s); bf16 logit shard {shard_mib:.0f} MiB per rank")
    print(
        f"  check vs Megatron (fp32 logits): target log-prob rel. loss diff {check['loss_target']:.1e}, "
        f"max |grad diff| {check['grad_target']:.1e}; chunked {check['loss_target_chunked']:.1e}, "
        f"{check['grad_target_chunked']:.1e}"
    )
    for d, label in (("bf16", "bf16"), ("fp32", "fp32 (secondary)")):
        megatron_ms = med[d]["megatron"] * 1e3, stats[d]["megatron"][1] * 1e3
        print(
            f"  time {label}: Megatron CE fwd+bwd {megatron_ms[0]:.1f} ms [{megatron_ms[1]:.1f}] | "
            f"target log-prob {both(d, 'target')} | DisCorD unchunked {both(d, 'discord')}"
        )
    print(
        f"  peak extra memory (bf16, max over ranks): Megatron {mem['megatron'] / MIB:.1f} MiB | "
        f"target unchunked {mratio('target'):.3f}x, chunked {mratio('target_chunked'):.3f}x | "
        f"DisCorD unchunked {mratio('discord'):.3f}x, chunked {mratio('discord_chunked'):.3f}x"
    )
    print(
        f"  time bf16 chunked (chunk_size={cfg.chunk}): target log-prob {both('bf16', 'target_chunked')} | "
        f"DisCorD {both('bf16', 'discord_chunked')}"
    )
    return {
        "time": ratio("bf16", "discord"),
        "mem": max(mratio("target_chunked"), mratio("discord_chunked")),
    }


def _parse() -> tuple[argparse.Namespace, Config]:
    """Command-line flags, and the configuration they give."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: S=256, 2 timed repetitions")
    parser.add_argument("--profile", action="store_true", help="print the profiler tables anyway")
    parser.add_argument("--seq", type=int, default=None, help="sequence length S (default 2048; quick: 256)")
    parser.add_argument("--batch", type=int, default=1, help="micro-batch size B")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size V")
    parser.add_argument("--chunk", type=int, default=256, help="rows per chunk (at most S/4)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 9; quick: 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    # Internal: the worker processes.
    parser.add_argument("--worker", choices=("time", "mem"), help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="megatron", help=argparse.SUPPRESS)
    args = parser.parse_args()
    seq = args.seq if args.seq is not None else (256 if args.quick else 2048)
    reps = args.reps if args.reps is not None else (2 if args.quick else 9)
    chunk = min(args.chunk, max(1, seq // 4))  # always several chunks
    cfg = Config(seq=seq, batch=args.batch, vocab=args.vocab, chunk=chunk, reps=reps, warmup=args.warmup)
    return args, cfg


def main() -> None:
    """Run the benchmark, or (with the internal ``--worker`` flag) one worker process."""
    args, cfg = _parse()
    if args.worker:
        _worker_main(args, cfg)
        return
    start = time.perf_counter()
    print(
        f"bench/loss.py: B={cfg.batch} S={cfg.seq} V={cfg.vocab}; time: median of {cfg.reps} fwd+bwd after "
        f"{cfg.warmup} warm-up [fastest]; torch {torch.__version__}, {os.cpu_count()} CPU cores, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    timing = {tp: _start(cfg, tp, "time").results() for tp in TP_SIZES}  # one job at a time
    memory = _measure_memory(cfg)
    ratios = {tp: _report(cfg, tp, timing[tp], memory[tp]) for tp in TP_SIZES}
    time_ratio = max(r["time"] for r in ratios.values())
    mem_ratio = max(r["mem"] for r in ratios.values())
    time_ok, mem_ok = time_ratio <= TIME_TARGET, mem_ratio <= MEM_TARGET
    verdict = {True: "met", False: "MISSED"}
    print(f"target: DisCorD unchunked time ratio {time_ratio:.3f} <= {TIME_TARGET}: {verdict[time_ok]}")
    print(f"target: chunked peak extra memory ratio {mem_ratio:.3f} <= {MEM_TARGET}: {verdict[mem_ok]}")
    if args.profile or not time_ok:
        print(timing[1][0]["profile"])
    print(f"(bench took {time.perf_counter() - start:.0f} s)")
    print(f"RESULT discord_time_ratio={time_ratio:.3f} chunked_mem_ratio={mem_ratio:.3f}")


if __name__ == "__main__":
    main()
