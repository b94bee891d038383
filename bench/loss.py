"""CPU benchmark: our vocab-parallel log-prob and DisCorD loss against Megatron-core's cross-entropy.

What it measures, at tensor-parallel sizes TP=1 and TP=2 (two processes on the gloo backend),
for one micro-batch of ``B=1`` sequence of ``S=2048`` tokens over a ``V=32768`` vocabulary:

* **Time** of forward + backward (median of several repetitions after a warm-up) of

  - the baseline, ``megatron.core.tensor_parallel.vocab_parallel_cross_entropy`` (``.sum()``),
  - ``-vocab_parallel_target_logprobs(...).sum()`` (the same quantity, our implementation),
  - the full DisCorD loss, ``loss_from_logits(build_loss("discord"), ...)``,

  unchunked and chunked (``chunk_size`` rows at a time), reported as ratios against Megatron.
* **Peak extra memory**: the resident memory on top of the inputs, in a fresh process per
  measurement (one per rank), with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every large buffer is
  mmapped and handed back to the OS when freed. Inputs are allocated and touched first, the
  current RSS is read as the base, and the peak is ``ru_maxrss - base`` after forward + backward.
  For TP=2 it is the maximum over the ranks.

Why bf16 logits. A bf16 model's output layer produces bf16 logits, so that is the primary input.
Megatron's cross-entropy then makes an fp32 copy (``.float()``) and works on it in place, which
is the memory and time a real run pays; fp32 logits are reported as a secondary timing line.

Why the input is cloned. On fp32 input ``.float()`` is a no-op and Megatron's cross-entropy
works *in place*: it overwrites its input with ``exp(x - max)``, then the softmax, and finally
reuses that buffer as the gradient. Every repetition therefore gets a fresh clone of the logits,
made outside the timed region (for every variant alike). Gradients are taken with
``torch.autograd.grad`` so that no ``.grad`` accumulation (which may copy) is timed or counted; in
a model the gradient goes straight into the output layer's backward.

Threads: TP=1 uses ``torch.set_num_threads(2)``; TP=2 uses one thread per process (2 cores).

Run from the repository root: ``.venv/bin/python bench/loss.py`` (``--quick`` for a smoke test).
The last line is ``RESULT discord_time_ratio=<x> chunked_mem_ratio=<y>``, both the worst (max)
over the TP sizes; the chunked memory ratio is the worse of the target log-prob and DisCorD.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

TIME_TARGET = 1.10  # unchunked DisCorD fwd+bwd time / Megatron CE fwd+bwd time
MEM_TARGET = 0.5  # chunked peak extra memory / Megatron CE peak extra memory
MIB = 1024.0 * 1024.0
TAG = "BENCHJSON "  # workers print one line starting with this; the rest of their output is noise

# The measured variants: (name, loss kind, chunked).
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
    """Problem size and repetition counts shared by the orchestrator and the workers.

    Attributes:
        seq: sequence length S (tokens per row).
        batch: micro-batch size B.
        vocab: vocabulary size V (split evenly over TP ranks, no padding).
        chunk: rows per chunk for the chunked variants.
        reps: timed repetitions per variant (after ``warmup`` untimed ones).
        warmup: untimed repetitions per variant.
    """

    seq: int
    batch: int
    vocab: int
    chunk: int
    reps: int
    warmup: int

    def as_args(self) -> list[str]:
        """The command-line flags that reproduce this configuration in a worker."""
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
    """One rank's inputs. ``logits`` is ``[B, S, V/TP]``; Megatron gets its ``[S, B, V/TP]`` view."""

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


def _setup(tp: int, rank: int, port: int) -> Any:
    """Start gloo and Megatron's parallel state; return the tensor-parallel group.

    Megatron-core's ``initialize_model_parallel`` and its cross-entropy work on CPU with gloo as
    they are (no CUDA call is reached on this path), so no workaround is applied.
    """
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // tp))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return parallel_state.get_tensor_model_parallel_group()


def _make_inputs(cfg: Config, tp: int, rank: int, dtype: torch.dtype, seq: int | None = None) -> Inputs:
    """Random logits (this rank's shard, written in place: no temporary) and a DisCorD batch.

    Labels, mask and teacher log-probs are replicated (same seed on every rank); logits differ.
    """
    seq = cfg.seq if seq is None else seq
    shard = cfg.vocab // tp
    gen = torch.Generator().manual_seed(1234)
    labels = torch.randint(0, cfg.vocab, (cfg.batch, seq), generator=gen)
    loss_mask = torch.ones(cfg.batch, seq)
    loss_mask[:, : seq // 8] = 0.0  # a prompt that is not trained on
    teacher_logprobs = -torch.rand(cfg.batch, seq, generator=gen) * 8.0
    logits = torch.empty(cfg.batch, seq, shard, dtype=dtype)
    gen_logits = torch.Generator().manual_seed(4321 + rank)
    for row in range(seq):  # row by row: no full-size temporary raises the peak RSS
        logits[:, row].normal_(0.0, 2.0, generator=gen_logits)
    batch = {"labels": labels, "loss_mask": loss_mask, "teacher_logprobs": teacher_logprobs}
    return Inputs(logits=logits, batch=batch)


def _loss_fn(kind: str, chunk: int | None, inputs: Inputs, group: Any, vocab: int) -> Callable[[Tensor], Tensor]:
    """The scalar whose forward + backward is measured, as a function of the logits."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from nemo_dcod.losses import LossContext, LossInputs, build_loss
    from nemo_dcod.parallel.signals import loss_from_logits
    from nemo_dcod.parallel.vocab_parallel import vocab_parallel_logprobs, vocab_parallel_target_logprobs

    labels = inputs.batch["labels"]
    if kind == "megatron":
        target_sb = labels.transpose(0, 1)

        def megatron(x: Tensor) -> Tensor:
            return vocab_parallel_cross_entropy(x.transpose(0, 1), target_sb).sum()

        return megatron
    if kind == "target":

        def target(x: Tensor) -> Tensor:
            lp = vocab_parallel_target_logprobs(x, labels, group=group, vocab_size=vocab, chunk_size=chunk)
            return -lp.sum()

        return target
    loss = build_loss("discord")
    ctx = LossContext(dp_group=None)

    def discord(x: Tensor) -> Tensor:
        loss_sum, _, _ = loss_from_logits(
            loss, x, inputs.batch, ctx, tp_group=group, vocab_size=vocab, chunk_size=chunk
        )
        return loss_sum

    def discord_workaround(x: Tensor) -> Tensor:
        # What loss_from_logits does for a loss without top-k, minus its tail_from=1 (see _discord_ok).
        out = vocab_parallel_logprobs(
            x, labels.unsqueeze(-1), group=group, vocab_size=vocab, chunk_size=chunk,
            mask=inputs.batch["loss_mask"].bool(),
        )
        loss_inputs = LossInputs(
            student_logprobs=out.logprobs[..., 0],
            loss_mask=inputs.batch["loss_mask"],
            teacher_logprobs=inputs.batch["teacher_logprobs"],
        )
        loss_sum, _, _ = loss(loss_inputs, ctx)
        return loss_sum

    return discord if _discord_ok() else discord_workaround


def _discord_ok() -> bool:
    """Whether ``loss_from_logits(build_loss("discord"), ...)`` runs (base "ce", no teacher top-k).

    In this tree it raises ``ValueError: tail_from=1 must index into the last dim of ids (1)``:
    ``student_loss_inputs`` always passes ``tail_from=1``, which only fits when top-k ids follow
    the label. The bench then composes the same steps itself (``vocab_parallel_logprobs`` on the
    label with ``tail_from=0``, ``LossInputs``, the loss), which is what the call does once fixed.
    """
    from nemo_dcod.losses import LossContext, build_loss
    from nemo_dcod.parallel.signals import loss_from_logits

    batch = {
        "labels": torch.zeros(1, 2, dtype=torch.long),
        "loss_mask": torch.ones(1, 2),
        "teacher_logprobs": -torch.ones(1, 2),
    }
    try:
        loss_from_logits(build_loss("discord"), torch.zeros(1, 2, 4), batch, LossContext())  # type: ignore[arg-type]
    except ValueError as err:
        if "tail_from" not in str(err):
            raise
        return False
    return True


def _fwd_bwd(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Forward + backward; returns the gradient of the logits."""
    (grad,) = torch.autograd.grad(fn(x), x)
    return grad


def _check(cfg: Config, inputs: Inputs, group: Any, tp: int) -> dict[str, float]:
    """Agreement of our log-prob (and its gradient) with Megatron's CE on fp32 copies of the logits."""
    base = inputs.logits.float()
    results: dict[str, float] = {}
    grads: dict[str, Tensor] = {}
    for name in ("megatron", "target", "target_chunked"):
        kind, chunked = VARIANTS[name]
        fn = _loss_fn(kind, cfg.chunk if chunked else None, inputs, group, cfg.vocab)
        x = base.clone().requires_grad_(True)
        value = fn(x)
        (grads[name],) = torch.autograd.grad(value, x)
        results[f"loss_{name}"] = float(value)
    for name in ("target", "target_chunked"):
        diff = (grads[name] - grads["megatron"]).abs().max()
        if tp > 1:
            dist.all_reduce(diff, op=dist.ReduceOp.MAX, group=group)
        results[f"max_abs_grad_diff_{name}"] = float(diff)
        results[f"rel_loss_diff_{name}"] = abs(results[f"loss_{name}"] / results["loss_megatron"] - 1.0)
    return results


def _time_worker(cfg: Config, tp: int, rank: int, port: int) -> dict[str, Any]:
    """Per-repetition times of every variant, run round-robin so that drift hits all alike."""
    group = _setup(tp, rank, port)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "discord_ok": _discord_ok()}
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
        del inputs
    return out


def _mem_worker(cfg: Config, tp: int, rank: int, port: int, variant: str) -> dict[str, Any]:
    """Peak extra RSS of one forward + backward of ``variant`` on bf16 logits, in this fresh process."""
    group = _setup(tp, rank, port)
    kind, chunked = VARIANTS[variant]
    chunk = cfg.chunk if chunked else None
    # A tiny run first, so that lazy initialisation (imports, thread pools) happens before the base.
    small = _make_inputs(cfg, tp, rank, torch.bfloat16, seq=16)
    _fwd_bwd(_loss_fn(kind, 4 if chunked else None, small, group, cfg.vocab), small.logits.requires_grad_())
    del small
    inputs = _make_inputs(cfg, tp, rank, torch.bfloat16)
    fn = _loss_fn(kind, chunk, inputs, group, cfg.vocab)
    x = inputs.logits.requires_grad_(True)
    if tp > 1:
        dist.barrier(group=group)
    base = _rss_bytes()
    before = _max_rss_bytes()
    grad = _fwd_bwd(fn, x)
    peak = _max_rss_bytes()
    input_bytes = x.numel() * x.element_size()
    del grad
    return {
        "extra": peak - base,
        "slack": max(0, before - base),  # > 0: something before the base peaked higher
        "input": input_bytes,
    }


def _profile_worker(cfg: Config, port: int) -> str:
    """A torch.profiler breakdown (TP=1, bf16) of Megatron's CE and of unchunked DisCorD."""
    from torch.profiler import ProfilerActivity, profile

    group = _setup(1, 0, port)
    inputs = _make_inputs(cfg, 1, 0, torch.bfloat16)
    lines = []
    for name in ("megatron", "discord"):
        kind, _ = VARIANTS[name]
        fn = _loss_fn(kind, None, inputs, group, cfg.vocab)
        for _ in range(cfg.warmup):
            _fwd_bwd(fn, inputs.logits.clone().requires_grad_(True))
        x = inputs.logits.clone().requires_grad_(True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _fwd_bwd(fn, x)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48)
        lines.append(f"--- profile: {name} (TP=1, bf16, S={cfg.seq}) ---\n{table}")
    return "\n".join(lines)


def _worker_main(args: argparse.Namespace, cfg: Config) -> None:
    """Entry point of a worker process; prints one tagged JSON line."""
    if args.worker == "time":
        result: Any = _time_worker(cfg, args.tp, args.rank, args.port)
    elif args.worker == "mem":
        result = _mem_worker(cfg, args.tp, args.rank, args.port, args.variant)
    else:
        result = _profile_worker(cfg, args.port)
    print(TAG + json.dumps(result), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Orchestrator side: starts the workers, aggregates and prints.
# ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(cfg: Config, tp: int, worker: str, variant: str = "", mmap: bool = False) -> list[Any]:
    """Run ``tp`` worker processes (one per rank) to completion; return each rank's result."""
    port = _free_port()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if mmap:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    procs = []
    for rank in range(tp):
        cmd = [sys.executable, str(Path(__file__).resolve()), f"--worker={worker}", f"--tp={tp}"]
        cmd += [f"--rank={rank}", f"--port={port}", *cfg.as_args()]
        if variant:
            cmd.append(f"--variant={variant}")
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    for rank, proc in enumerate(procs):
        stdout, stderr = proc.communicate(timeout=600)
        tagged = [line[len(TAG) :] for line in stdout.splitlines() if line.startswith(TAG)]
        if proc.returncode != 0 or not tagged:
            sys.stderr.write(stdout + stderr)
            raise RuntimeError(f"worker {worker} {variant} tp={tp} rank={rank} failed (rc={proc.returncode})")
        results.append(json.loads(tagged[-1]))
    return results


def _median_over_ranks(per_rank: list[dict[str, Any]], dtype_name: str, name: str) -> float:
    """Median over repetitions of the slowest rank's time in each repetition."""
    reps = zip(*(r[dtype_name][name] for r in per_rank), strict=True)
    return statistics.median(max(rep) for rep in reps)


def _run_tp(cfg: Config, tp: int) -> dict[str, float]:
    """Time and memory of every variant at one TP size; prints its lines, returns the key ratios."""
    timing = _launch(cfg, tp, "time")
    check = timing[0]["check"]
    med = {d: {n: _median_over_ranks(timing, d, n) for n in timing[0][d]} for d in ("bf16", "fp32")}
    mem = {}
    for name in VARIANTS:
        ranks = _launch(cfg, tp, "mem", variant=name, mmap=True)
        mem[name] = max(r["extra"] for r in ranks)
        slack = max(r["slack"] for r in ranks)
        if slack > 8 * MIB:
            print(f"  warning: {name}: peak RSS before the base exceeded it by {slack / MIB:.1f} MiB")
    input_mib = cfg.batch * cfg.seq * (cfg.vocab // tp) * 2 / MIB

    def ratio(d: str, n: str) -> float:
        return med[d][n] / med[d]["megatron"]

    def mratio(n: str) -> float:
        return mem[n] / mem["megatron"]

    threads = timing[0]["threads"]
    print(f"TP={tp} ({tp} process(es), {threads} thread(s) each; bf16 logits shard {input_mib:.0f} MiB/rank)")
    print(
        f"  check (fp32, vs Megatron): rel loss diff {check['rel_loss_diff_target']:.1e} "
        f"(chunked {check['rel_loss_diff_target_chunked']:.1e}), max |grad diff| "
        f"{check['max_abs_grad_diff_target']:.1e} (chunked {check['max_abs_grad_diff_target_chunked']:.1e})"
    )
    if not timing[0]["discord_ok"]:
        print(
            "  note: loss_from_logits(build_loss('discord'), ...) raises 'tail_from=1 must index into the "
            "last dim of ids (1)'; DisCorD is timed via the equivalent vocab_parallel_logprobs + loss call"
        )
    for d in ("bf16", "fp32"):
        label = "bf16" if d == "bf16" else "fp32 (secondary)"
        print(
            f"  {label}: Megatron CE fwd+bwd {med[d]['megatron'] * 1e3:.1f} ms | target log-prob "
            f"{ratio(d, 'target'):.3f}x | DisCorD (unchunked) {ratio(d, 'discord'):.3f}x"
        )
    print(
        f"  bf16 chunked (chunk_size={cfg.chunk}): target log-prob {ratio('bf16', 'target_chunked'):.3f}x "
        f"| DisCorD {ratio('bf16', 'discord_chunked'):.3f}x of Megatron time"
    )
    print(
        f"  peak extra memory (bf16, max over ranks): Megatron {mem['megatron'] / MIB:.1f} MiB | "
        f"target unchunked {mratio('target'):.3f}x, chunked {mratio('target_chunked'):.3f}x | "
        f"DisCorD unchunked {mratio('discord'):.3f}x, chunked {mratio('discord_chunked'):.3f}x"
    )
    return {
        "discord_time_ratio": ratio("bf16", "discord"),
        "chunked_mem_ratio": max(mratio("target_chunked"), mratio("discord_chunked")),
    }


def _parse() -> tuple[argparse.Namespace, Config]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: S=256, 2 repetitions")
    parser.add_argument("--profile", action="store_true", help="always print the profiler breakdown")
    parser.add_argument("--seq", type=int, default=None, help="sequence length S (default 2048)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=256, help="rows per chunk for the chunked variants")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7)")
    parser.add_argument("--warmup", type=int, default=1)
    # Internal: worker processes.
    parser.add_argument("--worker", choices=("time", "mem", "profile"), help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=tuple(VARIANTS), default="megatron", help=argparse.SUPPRESS)
    args = parser.parse_args()
    seq = args.seq if args.seq is not None else (256 if args.quick else 2048)
    reps = args.reps if args.reps is not None else (2 if args.quick else 7)
    chunk = min(args.chunk, max(1, seq // 4))  # always more than one chunk
    cfg = Config(seq=seq, batch=args.batch, vocab=args.vocab, chunk=chunk, reps=reps, warmup=args.warmup)
    return args, cfg


def main() -> None:
    """Run the benchmark (or, with the internal ``--worker`` flag, one worker process)."""
    args, cfg = _parse()
    if args.worker:
        _worker_main(args, cfg)
        return
    start = time.perf_counter()
    print(
        f"bench/loss.py: B={cfg.batch} S={cfg.seq} V={cfg.vocab}, {cfg.warmup} warm-up + {cfg.reps} timed "
        f"repetitions (median), torch {torch.__version__}, {os.cpu_count()} CPU cores"
    )
    results = {tp: _run_tp(cfg, tp) for tp in (1, 2)}
    time_ratio = max(r["discord_time_ratio"] for r in results.values())
    mem_ratio = max(r["chunked_mem_ratio"] for r in results.values())
    time_ok, mem_ok = time_ratio <= TIME_TARGET, mem_ratio <= MEM_TARGET
    print(f"target: unchunked DisCorD time ratio {time_ratio:.3f} <= {TIME_TARGET}: {'met' if time_ok else 'MISSED'}")
    print(f"target: chunked peak extra memory ratio {mem_ratio:.3f} <= {MEM_TARGET}: {'met' if mem_ok else 'MISSED'}")
    if args.profile or not time_ok:
        print(_launch(cfg, 1, "profile")[0])
    print(f"(total {time.perf_counter() - start:.0f} s)")
    print(f"RESULT discord_time_ratio={time_ratio:.3f} chunked_mem_ratio={mem_ratio:.3f}")


if __name__ == "__main__":
    main()
