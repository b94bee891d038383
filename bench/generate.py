"""CPU benchmark: ``nemo-dcod generate`` throughput against plain batched ``model.generate``.

**generate_ratio**: generated tokens/s of :func:`~nemo_dcod.generate.run.run_generate` (read and
check the problems, render and tokenize the prompts, batched left-padded sampling through eval's
``TransformersGenerator`` recording every sampled token's untempered log-prob, decode, grade, write
the JSONL shard and its meta, and the report) over generated tokens/s of the
plain loop any script would write: the same token-id prompts, longest first, left-padded, in the
same batches, through ``model.generate`` with the same sampling settings and seed (no log-probs,
nothing decoded or written). Both draw the same tokens (checked: the recorder changes no logit), so
the ratio is the cost of the log-probs and of everything around them. Target >= 0.9.

Model: a random Llama (4 layers, width 256, 8/2 heads, MLP 768) with a word-level tokenizer of
``--vocab`` tokens (8192) and a chat template, made in the run; ``--problems`` prompts of 6-60 words;
``--samples`` per problem at temperature 1; ``--max-new-tokens`` each (the random model rarely ends
early: every run then ends with generate's "nothing usable" error after writing its shard and
report, which the benchmark expects); batch ``--batch-size``; fp32. The model is loaded once and
shared by both sides. Timings: ``--repeats`` pairs of runs, interleaved (A B B A ...); the ratio is
the median over the pairs of each pair's ratio (its two runs are adjacent in time, so a change in
background load between pairs cancels; the 2026-12-03 run, whose first pair ran under a load of 8
and its second half-loaded, showed a ratio of medians of 1.51 from that alone), with the fastest
run of each side's ratio printed beside it; every generate run writes a fresh out_dir.

Run from the repository root: ``.venv/bin/python bench/generate.py`` (~2 min on 2 cores);
``--quick`` for a smoke test. The last line is ``RESULT generate_ratio=<x>``.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def _make_teacher(root: Path, vocab: int) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>", "user", "assistant", "system"])}
    words.update({f"w{i}": len(words) + i for i in range(vocab - len(words))})
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = root / "teacher"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(path)
    return path


def _problems(root: Path, n: int, vocab: int) -> Path:
    rng = random.Random(0)
    path = root / "problems.jsonl"
    with path.open("w") as f:
        for i in range(n):
            words = " ".join(f"w{rng.randrange(vocab - 8)}" for _ in range(rng.randint(6, 60)))
            f.write(json.dumps({"id": i, "question": words, "answer": f"#### {i}"}) + "\n")
    return path


def _ours(cfg: Any, generator: Any, out: Path) -> tuple[float, int]:
    from nemo_dcod.generate.config import GenerateError
    from nemo_dcod.generate.run import run_generate

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    try:
        run_generate(cfg, generator=generator)
    except GenerateError as exc:  # a random teacher seldom ends a trace: "nothing usable" (expected)
        if "is usable" not in str(exc):
            raise
    seconds = time.perf_counter() - started
    return seconds, int(json.loads((out / "report.json").read_text())["tokens"])


def _baseline(
    model: Any, prompt_ids: list[list[int]], args: argparse.Namespace, seed: int
) -> tuple[float, int]:
    """The plain loop: same jobs (longest prompt first), batches, left padding, sampling and seed."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=args.max_new_tokens,
        bos_token_id=1,
        pad_token_id=3,
        eos_token_id=[2],
    )
    jobs = [i for i in range(len(prompt_ids)) for _ in range(args.samples)]
    jobs.sort(key=lambda i: -len(prompt_ids[i]))
    started = time.perf_counter()
    torch.manual_seed(seed)
    tokens = 0
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        width = max(len(prompt_ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), 3, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, width - len(prompt_ids[i]) :] = torch.tensor(prompt_ids[i])
            mask[row, width - len(prompt_ids[i]) :] = 1
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, generation_config=config, use_model_defaults=False
            )
        for row in out[:, width:].tolist():
            tokens += next((t for t, tok in enumerate(row) if tok == 2), len(row))
    return time.perf_counter() - started, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--problems", type=int, default=24)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a smoke test: tiny sizes, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.problems, args.max_new_tokens, args.repeats = 4, 8, 1

    import torch

    from nemo_dcod.config import load_config
    from nemo_dcod.eval.generation import TransformersGenerator
    from nemo_dcod.generate.config import GenerateConfig
    from nemo_dcod.generate.plan import build_plan
    from nemo_dcod.generate.shards import shard_seed

    root = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    try:
        teacher = _make_teacher(root, args.vocab)
        problems = _problems(root, args.problems, args.vocab)
        cfg = load_config(
            GenerateConfig,
            None,
            [
                f"inputs=[{problems}]",
                f"teacher={teacher}",
                "fields.problem=question",
                "fields.reference=answer",
                "prompt_template='{problem}'",
                f"sampling.samples_per_problem={args.samples}",
                "sampling.temperature=1.0",
                f"sampling.max_new_tokens={args.max_new_tokens}",
                f"problems_per_shard={args.problems}",  # one shard: one seed for both sides
                f"batch_size={args.batch_size}",
                "grading.grader=string",
                "device=cpu",
                "dtype=float32",
                "progress=false",
                f"out_dir={root / 'out'}",
            ],
        )
        plan = build_plan(cfg)
        seed = shard_seed(cfg.sampling.seed, 0)
        generator = TransformersGenerator(
            str(teacher),
            plan.tokenizer,
            plan.stop_ids,
            batch_size=args.batch_size,
            device="cpu",
            progress=False,
        )
        print(
            f"model: Llama 4 x 256, V={args.vocab}, fp32, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {args.problems} prompts x {args.samples} samples, "
            f"{args.max_new_tokens} new tokens max, batch {args.batch_size}"
        )
        import contextlib
        import io

        ours: list[float] = []
        base: list[float] = []
        counts = set()
        for r in range(args.repeats):
            for side in ("ours", "base") if r % 2 == 0 else ("base", "ours"):
                if side == "ours":
                    with contextlib.redirect_stdout(io.StringIO()):
                        seconds, tokens = _ours(cfg, generator, root / "out")
                    ours.append(tokens / seconds)
                else:
                    seconds, tokens = _baseline(generator.model, plan.prompt_ids, args, seed)
                    base.append(tokens / seconds)
                counts.add((side, tokens))
                rate = tokens / seconds
                print(f"repeat {r} {side:>4}: {tokens} tokens in {seconds:.2f} s = {rate:.1f} tokens/s")
        same = len({t for _, t in counts}) == 1
        print(f"both sides generated the same number of tokens every run: {same} ({sorted(counts)})")
        pairs = [a / b for a, b in zip(ours, base, strict=True)]
        ratio = statistics.median(pairs)
        print(f"per-pair ratios (ours / model.generate): {', '.join(f'{x:.3f}' for x in pairs)}")
        print(
            f"median tokens/s: model.generate {statistics.median(base):.1f}, nemo-dcod generate "
            f"{statistics.median(ours):.1f}; fastest runs' ratio {max(ours) / max(base):.3f}"
        )
        print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"target: generate_ratio {ratio:.3f} >= 0.9: {'met' if ratio >= 0.9 else 'missed'}")
        print(f"RESULT generate_ratio={ratio:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
