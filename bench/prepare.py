"""CPU benchmark: ``nemo-dcod prepare`` and ``nemo-dcod score`` throughput against their plain baselines.

**prepare_ratio**: tokens/s of :func:`~nemo_dcod.data.prepare.run_prepare` (read JSONL, render the
chat template, tokenize with offsets, assistant-only loss mask, answer filter off, best-fit packing,
sharded store on disk) over tokens/s of the tokenization any SFT script does with ``datasets``:
``Dataset.from_json(...).map(apply_chat_template(tokenize=True), batched=True, num_proc=workers)``
on the same records, same tokenizer, same worker count. The baseline produces token lists only (no
mask, no packing, nothing written beyond the datasets cache). Target >= 1.0.

**score_ratio**: tokens/s of the scoring loop (:func:`~nemo_dcod.score.ranks.score_rank`: packed rows
through the Megatron model forward only, vocab-parallel log-prob of each label and top-k, written
into the store's columns) over tokens/s of a bare forward pass of the same model on the same rows
(``model(tokens, position_ids, attention_mask)`` under ``torch.no_grad``, logits discarded).
Target >= 0.9.

Records: synthetic math-style prompt/response traces (``--records``, default 4000, ~250 tokens
each); the tokenizer: a byte-level BPE (8k merges) trained on them in the same run and wrapped as a
Hugging Face fast tokenizer with a ChatML template, so that the per-token cost is that of a real
subword tokenizer. Timings: the median of ``--repeats`` runs of each side, interleaved (A B B A ...)
so a change in background load hits both; every prepare run writes a fresh store.

The scored model: a random Llama (4 layers, width 256, GQA 8/2 heads) with the same tokenizer,
imported through ``nemo-dcod import``; 48 packed rows of 1024 tokens, micro-batches of 2, fp32,
one process (TP = PP = 1; the layouts' equality is a test, not a benchmark).

Run from the repository root: ``.venv/bin/python bench/prepare.py`` (a few minutes on 2 cores);
``--quick`` for a smoke test. The last line is ``RESULT prepare_ratio=<x> score_ratio=<y>``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` prompt/response traces of multi-step arithmetic, ~250 tokens each."""
    rng = random.Random(seed)
    words = ["first", "then", "next", "so", "therefore", "we", "compute", "add", "the", "result", "is"]
    out = []
    for i in range(n):
        a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(2, 99)
        steps = []
        value = a
        for _ in range(rng.randint(6, 14)):
            op, x = rng.choice("+-*"), rng.randint(2, 99)
            new = value + x if op == "+" else value - x if op == "-" else value * x % 100000
            steps.append(f"{' '.join(rng.choices(words, k=4))}: {value} {op} {x} = {new}.")
            value = new
        out.append(
            {
                "prompt": f"Problem {i}: start from {a}, combine with {b} and {c} as described. What is it?",
                "response": " ".join(steps) + f" The answer is \\boxed{{{value}}}.",
            }
        )
    return out


def make_tokenizer(records: list[dict[str, str]], out: Path) -> Path:
    """A byte-level BPE trained on ``records``, saved as a Hugging Face fast tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((r["prompt"] + "\n" + r["response"] for r in records), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


def time_prepare(
    records_path: Path, tokenizer: Path, store: Path, workers: int, seq_length: int
) -> tuple[float, int]:
    """(seconds, tokens) of one ``run_prepare`` into a fresh ``store``."""
    from nemo_dcod.config import load_config
    from nemo_dcod.data.config import PrepareConfig
    from nemo_dcod.data.prepare import run_prepare

    cfg = load_config(
        PrepareConfig,
        None,
        [
            f"inputs=[{records_path}]",
            f"tokenizer={tokenizer}",
            f"out_dir={store}",
            f"seq_length={seq_length}",
            f"workers={workers}",
            "records_per_shard=1000",
            "answer_filter=none",
        ],
    )
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()  # from reading the records to the finished store
    report = run_prepare(cfg, quiet=True)
    seconds = time.perf_counter() - start
    return seconds, int(report["tokens"])


def time_datasets_map(records_path: Path, tokenizer: Path, cache: Path, workers: int) -> tuple[float, int]:
    """(seconds, tokens) of the plain ``datasets.map`` chat-template tokenization (fresh cache)."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(tokenizer))

    def tokenize(batch: dict[str, list[str]]) -> dict[str, Any]:
        conversations = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            for p, r in zip(batch["prompt"], batch["response"], strict=True)
        ]
        return {"input_ids": tok.apply_chat_template(conversations, tokenize=True)}

    ds = datasets.Dataset.from_json(str(records_path), cache_dir=str(cache))
    ds = ds.map(
        tokenize, batched=True, num_proc=workers if workers > 1 else None, remove_columns=ds.column_names
    )
    tokens = sum(len(ids) for ids in ds["input_ids"])
    return time.perf_counter() - start, tokens


def bench_prepare(work: Path, records: int, workers: int, repeats: int) -> float:
    rows = make_records(records)
    records_path = work / "records.jsonl"
    records_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = make_tokenizer(rows[:2000], work / "tokenizer")
    ours: list[float] = []
    plain: list[float] = []
    order = ["prepare", "map", "map", "prepare"] * ((repeats + 1) // 2)
    for i, side in enumerate(["prepare", "map", *order]):  # the first pair warms caches and imports
        if side == "prepare":
            seconds, tokens = time_prepare(records_path, tokenizer, work / "store", workers, 2048)
        else:
            seconds, tokens = time_datasets_map(records_path, tokenizer, work / "hf_cache", workers)
        if i >= 2:
            (ours if side == "prepare" else plain).append(tokens / seconds)
        print(f"  {side:<8} {tokens} tokens in {seconds:.2f} s: {tokens / seconds:,.0f} tokens/s", flush=True)
    ratio = statistics.median(ours) / statistics.median(plain)
    print(
        f"prepare: {statistics.median(ours):,.0f} tokens/s (run_prepare, {workers} workers) vs "
        f"{statistics.median(plain):,.0f} tokens/s (datasets.map, num_proc={workers}): {ratio:.3f}x"
    )
    return ratio


def make_teacher(tokenizer: Path, out: Path) -> Path:
    """A small random Llama (4 layers, width 256) with ``tokenizer``, imported to NeMo 2."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from nemo_dcod.config import load_config
    from nemo_dcod.convert.config import ImportConfig
    from nemo_dcod.convert.hf_import import run_import

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = out / "hf"
    AutoModelForCausalLM.from_config(config).save_pretrained(hf, safe_serialization=True)
    tok.save_pretrained(hf)
    run_import(load_config(ImportConfig, None, [f"hf={hf}", f"out={out / 'nemo'}", "verify.enabled=false"]))
    return out / "nemo"


def bench_score(work: Path, repeats: int, rows: int) -> float:
    """Scoring tokens/s (``run_score``, in this process) over a bare forward of the same rows."""
    import torch

    from nemo_dcod.config import load_config
    from nemo_dcod.data.store import PackedStore
    from nemo_dcod.model.loading import load_nemo_model, megatron_parallel, pipeline_forward
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode
    from nemo_dcod.score.config import ScoreConfig
    from nemo_dcod.score.ranks import micro_batches_of
    from nemo_dcod.score.run import run_score

    enable_cpu_mode()
    records = make_records(rows * 4, seed=1)  # ~4 documents per 1024-token row
    (work / "score_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    unscored = work / "score_store"
    time_prepare(work / "score_records.jsonl", work / "tokenizer", unscored, 1, 1024)
    checkpoint = make_teacher(work / "tokenizer", work / "teacher")
    mbs = 2
    store = PackedStore(unscored)
    tokens = len(store) * 1024

    def bare() -> float:
        with megatron_parallel(1):
            mcore, _ = load_nemo_model(checkpoint, torch.float32)
            batches = micro_batches_of(store, range(len(store) - len(store) % mbs), mbs, "cpu")
            start = time.perf_counter()
            pipeline_forward(mcore, batches, lambda logits, batch: None)
            return (len(batches) * mbs * 1024) / (time.perf_counter() - start)

    def scored() -> float:
        target = work / "scored_store"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(unscored, target)
        cfg = load_config(
            ScoreConfig,
            None,
            [f"checkpoint={checkpoint}", f"store={target}", "topk=8", f"trainer.micro_batch_size={mbs}"],
        )
        summary = run_score(cfg)  # its tokens/s: the scoring loop (forward + columns + writes)
        seconds = summary["tokens"] / summary["tokens_per_second"]  # it counts non-padding tokens
        return float(summary["rows"] * 1024 / seconds)  # positions, as the bare forward counts them

    ours: list[float] = []
    plain: list[float] = []
    for i, side in enumerate(["score", "bare", *(["score", "bare", "bare", "score"] * ((repeats + 1) // 2))]):
        rate = scored() if side == "score" else bare()
        if i >= 2:
            (ours if side == "score" else plain).append(rate)
        print(f"  {side:<8} {tokens} tokens: {rate:,.0f} tokens/s", flush=True)
    ratio = statistics.median(ours) / statistics.median(plain)
    print(
        f"score: {statistics.median(ours):,.0f} tokens/s (run_score, top-8, written) vs "
        f"{statistics.median(plain):,.0f} tokens/s (bare forward, logits discarded): {ratio:.3f}x"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="smoke test: 800 records, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.records, args.repeats = 800, 2
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepare_ratio = bench_prepare(Path(tmp), args.records, args.workers, args.repeats)
        score_ratio = bench_score(Path(tmp), args.repeats, rows=16 if args.quick else 48)
    print(f"RESULT prepare_ratio={prepare_ratio:.3f} score_ratio={score_ratio:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
