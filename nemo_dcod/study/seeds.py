"""A seed's shared part, made once: task files, the store with the teacher's signals, the start.

In the seed's folder (``<run_dir>/seeds/seed_<n>-<key>``):

1. ``tokenizer/`` (the task's word-level Hugging Face tokenizer), ``traces.jsonl`` (the program
   teacher's traces with their exact per-token log-probs, as an engine reports them) and
   ``heldout.jsonl`` (held-out problems in GSM8K's format);
2. ``store/``: ``nemo-dcod prepare`` with the correctness filter, then the teacher's exact top-k
   (:mod:`.signals`);
3. the start, one checkpoint every student of the seed loads (``model.init_from``): with
   ``start.kind=random`` the untrained initialisation, saved by a 1-step run at lr 1e-30 (Adam's
   first update is ~lr, far below half an ulp of any weight, so the saved weights are the initial
   ones bit for bit); with ``warm``, SFT on the warm-up corpus (:mod:`.tasks`) for
   ``start.warm_steps``;
4. ``prep.json``, written last and atomically: what the students read (paths, the teacher's and
   prepare's figures). A folder without it is unfinished and is made again.

The folder's key hashes everything that changes its content (task, start, training sizes, seed),
so configs that share a run_dir share a seed's start exactly when it would be the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from nemo_dcod.study.config import StudyConfig
from nemo_dcod.study.launch import check, train_config, train_run

__all__ = ["PREP_FILE", "prep_seed", "read_prep"]

PREP_FILE = "prep.json"


def _prepare(traces: Path, tokenizer: Path, store: Path, seq_length: int, filtered: bool) -> dict[str, Any]:
    from nemo_dcod.data.config import FieldsSection, PrepareConfig
    from nemo_dcod.data.prepare import run_prepare

    fields = (
        FieldsSection(
            prompt="question",
            response="output",
            reference="answer",
            teacher_tokens="token_ids",
            teacher_logprobs="logprobs",
        )
        if filtered
        else FieldsSection(prompt="question", response="output")
    )
    cfg = PrepareConfig(
        inputs=[str(traces)],
        format="jsonl",
        fields=fields,
        tokenizer=str(tokenizer),
        seq_length=seq_length,
        overlong="drop",
        # Input order (traces are written in random order), so every row mixes both styles; best
        # fit sorts by length, which would group the styles into different parts of each epoch.
        packing="sequential",
        answer_filter="gsm8k" if filtered else "none",
        records_per_shard=1_000_000,
        out_dir=str(store),
    )
    check(cfg, "prepare")
    report: dict[str, Any] = run_prepare(cfg)
    return {k: v for k, v in report.items() if isinstance(v, int | float | str)}


def _start(
    cfg: StudyConfig, seed: int, where: Path, store: Path, tokenizer: Path, vocab: int
) -> dict[str, Any]:
    """The seed's initial checkpoint: the random initialisation, or a warm-up run's result."""
    from nemo_dcod.study.tasks import write_textbook

    t, s, tr = cfg.task, cfg.start, cfg.training
    assert t.seq_length is not None and t.num_ops is not None and t.modulus is not None

    def sft(run_dir: Path, data: Path, steps: int, lr: float) -> Any:
        """SFT at TP=1 with the students' sizes (any TP loads the checkpoint, resharded)."""
        return train_config(
            run_dir,
            data,
            seed=seed,
            vocab_size=vocab,
            seq_length=t.seq_length,  # type: ignore[arg-type]
            steps=steps,
            global_batch_size=tr.global_batch_size,
            lr=lr,
            tp=1,
            loss={"name": "sft"},
            hidden_size=tr.hidden_size,
            ffn_hidden_size=tr.ffn_hidden_size,
            shuffle=tr.shuffle,
        )

    if s.kind == "random":
        run = sft(where / "init", store, 1, 1e-30)
        return {"kind": "random", "checkpoint": str(train_run(run, where / "logs", "init"))}
    corpus = write_textbook(s.lengths(t.num_ops), s.warm_problems, t.modulus, seed, where / "textbook.jsonl")
    warm_store = where / "warm_store"
    report = _prepare(where / "textbook.jsonl", tokenizer, warm_store, t.seq_length, filtered=False)
    checkpoint = train_run(sft(where / "warm", warm_store, s.warm_steps, s.warm_lr), where / "logs", "warm")
    losses = [
        json.loads(line)["loss"] for line in (where / "warm" / "metrics.jsonl").read_text().splitlines()
    ]
    return {
        "kind": "warm",
        "checkpoint": str(checkpoint),
        "corpus": corpus,
        "warm_lengths": s.lengths(t.num_ops),
        "warm_steps": s.warm_steps,
        "warm_prepare": report,
        "warm_final_loss": losses[-1] if losses else None,
    }


def prep_seed(cfg: StudyConfig, seed: int, where: Path) -> dict[str, Any]:
    """Make the seed's folder ``where`` (an unfinished one is replaced); returns its ``prep.json``.

    ``cfg`` is resolved (:meth:`StudyConfig.resolved`).
    """
    from nemo_dcod.data.store import write_json_atomic
    from nemo_dcod.demo.task import build_tokenizer
    from nemo_dcod.study.signals import write_teacher_topk
    from nemo_dcod.study.tasks import make_task, sample_traces, teacher_stats, write_benchmark, write_traces

    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    t = cfg.task
    assert t.seq_length is not None
    seed_task = make_task(t, seed)
    tokenizer = where / "tokenizer"
    build_tokenizer(seed_task.vocab, tokenizer)
    traces = sample_traces(seed_task, seed)
    write_traces(traces, where / "traces.jsonl")
    write_benchmark(seed_task.eval_problems, where / "heldout.jsonl")
    store = where / "store"
    prepare = _prepare(where / "traces.jsonl", tokenizer, store, t.seq_length, filtered=True)
    if cfg.training.topk:
        write_teacher_topk(store, traces, seed_task.teacher, cfg.training.topk)
    start = _start(cfg, seed, where, store, tokenizer, len(seed_task.vocab))
    prep = {
        "seed": seed,
        "tokenizer": str(tokenizer),
        "traces": str(where / "traces.jsonl"),
        "heldout": str(where / "heldout.jsonl"),
        "store": str(store),
        "vocab_size": len(seed_task.vocab),
        "teacher": teacher_stats(traces),
        "prepare": prepare,
        "start": start,
    }
    write_json_atomic(where / PREP_FILE, prep)
    return prep


def read_prep(where: Path) -> dict[str, Any] | None:
    """A finished seed folder's ``prep.json``; None when the folder is unfinished or absent."""
    try:
        prep: dict[str, Any] = json.loads((where / PREP_FILE).read_text())
    except (OSError, ValueError):
        return None
    return prep
