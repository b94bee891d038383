"""``nemo-dcod demo``: the whole pipeline, end to end, on a synthetic reasoning task, on CPU.

Every stage is the real one, called through its config dataclass, as a user would run it:

1. **task**: the word-level tokenizer (saved as a Hugging Face tokenizer), training and held-out
   problems (:mod:`.task`). Held-out problems are written in GSM8K's public JSONL format.
2. **teacher**: the program teacher (:mod:`.teacher`) writes one trace per training problem with its
   exact per-token log-probs (token ids + log-probs, as a generation engine reports them).
3. **prepare** (:func:`nemo_dcod.data.prepare.run_prepare`): the correctness filter (``####``
   answers against the references), chat template, assistant-only mask, teacher log-probs aligned
   to the tokens, packing into the sample store.
4. **train** (:func:`nemo_dcod.train.run.run_train`, through ``nemo-dcod train`` under torchrun):
   one student per loss at TP = ``tensor_model_parallel_size`` in gloo processes, all with the
   same seed (hence identical initial weights: Megatron's initialisation is a function of the
   seed and the layout) and the same batches. DisCorD's λ is 0 for its warm-up fraction, which
   makes its loss *equal* to SFT's there: the report checks the students' losses agree exactly
   over those steps, which they can only do from identical weights. Each training is its own
   process tree: Lightning and Megatron keep global state, and the ranks must run the train
   command, not this demo. The students train side by side (their start-up, checkpoint writes and
   shutdown, mostly waiting, overlap).
5. **export** (:func:`nemo_dcod.convert.hf_export.run_export`): each student to Hugging Face,
   verified by logit parity with the NeMo checkpoint on task prompts.
6. **eval** (:func:`nemo_dcod.eval.run.run_eval`): greedy pass@1 of both exported students on the
   held-out problems with transformers; the style each answer took is read from its first word.
7. **exposure** (:mod:`.exposure`, :mod:`.skill`): ExAccErr and the KL on teacher prefixes of each
   exported student, and its accuracy in each style when the style word is forced.
8. **report** (:mod:`.report`): ``summary.json``, ``summary.md``, ``demo.png``, the printed table and
   the path of every artifact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from nemo_dcod.config import to_yaml
from nemo_dcod.demo.config import DemoConfig
from nemo_dcod.demo.task import STYLES, Problem, TaskVocab, build_tokenizer, sample_problems
from nemo_dcod.demo.teacher import ProgramTeacher, TeacherTrace
from nemo_dcod.losses.registry import label_of

__all__ = ["DemoError", "run_demo"]

_MARKER = "demo.json"
"""Written first into a demo's run directory: what marks it as safe to replace on the next run."""


class DemoError(RuntimeError):
    """A demo stage failed; the message names the stage and its log."""


def _log(message: str, started: float) -> None:
    print(f"[demo {time.perf_counter() - started:6.1f}s] {message}", flush=True)


def _fresh_run_dir(run_dir: Path) -> None:
    """Replace an earlier demo run; refuse to delete a directory the demo did not make."""
    if run_dir.exists() and any(run_dir.iterdir()):
        # Earlier demo versions wrote config.yaml + summary.json and no marker.
        legacy = (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
        if not ((run_dir / _MARKER).is_file() or legacy):
            raise DemoError(
                f"run_dir={run_dir} exists, is not empty and holds no {_MARKER} (not a demo run): "
                "choose another run_dir or remove it."
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / _MARKER).write_text(json.dumps({"created_by": "nemo-dcod demo"}) + "\n")


# ------------------------------------------------------------------------------------------------
# Task and teacher
# ------------------------------------------------------------------------------------------------


def _write_traces(traces: list[TeacherTrace], path: Path) -> None:
    with path.open("w") as f:
        for trace in traces:
            record = {
                "question": trace.problem.text,
                "answer": str(trace.problem.answer()),
                "output": trace.text,
                "token_ids": trace.token_ids,
                "logprobs": trace.logprobs,
                "style": trace.style,
            }
            f.write(json.dumps(record) + "\n")


def _write_benchmark(problems: list[Problem], path: Path) -> None:
    """Held-out problems in GSM8K's public format (``question``, ``answer`` ending ``#### x``)."""
    with path.open("w") as f:
        for i, problem in enumerate(problems):
            f.write(
                json.dumps(
                    {"id": f"heldout-{i}", "question": problem.text, "answer": f"#### {problem.answer()}"}
                )
                + "\n"
            )


def _teacher_stats(traces: list[TeacherTrace]) -> dict[str, Any]:
    out: dict[str, Any] = {"traces": len(traces), "correct": sum(t.correct for t in traces)}
    for style in ("stepwise", "shortcut"):
        mine = [t for t in traces if t.style == style]
        out[style] = {"traces": len(mine), "correct": sum(t.correct for t in mine)}
    kept = out["stepwise"]["correct"] + out["shortcut"]["correct"]
    out["shortcut_share_after_filter"] = out["shortcut"]["correct"] / kept if kept else float("nan")
    return out


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------


def _prepare(cfg: DemoConfig, traces: Path, tokenizer: Path, store: Path) -> dict[str, Any]:
    from nemo_dcod.data.config import FieldsSection, PrepareConfig
    from nemo_dcod.data.prepare import run_prepare

    prepare_cfg = PrepareConfig(
        inputs=[str(traces)],
        format="jsonl",
        fields=FieldsSection(
            prompt="question",
            response="output",
            reference="answer",
            teacher_tokens="token_ids",
            teacher_logprobs="logprobs",
        ),
        tokenizer=str(tokenizer),
        seq_length=cfg.seq_length,
        overlong="drop",
        # Input order (traces are written in random order), so every row mixes both styles; best
        # fit sorts by length, which would group the styles into different parts of each epoch.
        packing="sequential",
        answer_filter="gsm8k",
        records_per_shard=max(cfg.num_train_problems, 1),
        out_dir=str(store),
    )
    _check(prepare_cfg, "prepare")
    report: dict[str, Any] = run_prepare(prepare_cfg)
    return report


def _check(stage_cfg: Any, stage: str) -> None:
    from nemo_dcod.config import ConfigError

    problems = stage_cfg.problems()
    if problems:
        raise ConfigError(problems, f"demo's {stage} config")


def _train_config(
    cfg: DemoConfig, run_dir: Path, store: Path, vocab_size: int, student: dict[str, Any]
) -> Any:
    """A student's :class:`TrainConfig`: the same seed, data and schedule for every student."""
    from nemo_dcod.parallel.layout import ParallelSection
    from nemo_dcod.train.config import (
        DataSection,
        ModelSection,
        OptimSection,
        TrainConfig,
        TrainerSection,
    )

    tp = cfg.tensor_model_parallel_size
    return TrainConfig(
        run_dir=str(run_dir),
        seed=1234 + cfg.seed,  # NeMo's Megatron seeding rejects 0
        resume=False,
        model=ModelSection(
            family="llama3.1",
            size="tiny",
            spec="local",
            hidden_size=cfg.hidden_size,
            ffn_hidden_size=cfg.ffn_hidden_size,
        ),
        parallel=ParallelSection(tensor_model_parallel_size=tp),
        optim=OptimSection(
            lr=cfg.lr,
            min_lr=cfg.lr / 10,
            warmup_steps=min(10, cfg.steps // 10),
            weight_decay=0.0,
            clip_grad=1.0,
        ),
        data=DataSection(
            source="store",
            path=str(store),
            vocab_size=vocab_size,
            seq_length=cfg.seq_length,
            num_val_samples=0,
        ),
        trainer=TrainerSection(
            max_steps=cfg.steps,
            global_batch_size=cfg.global_batch_size,
            micro_batch_size=cfg.global_batch_size,  # data-parallel size 1: one micro-batch per step
            devices=tp,
            log_every_n_steps=max(cfg.steps // 5, 1),
            ckpt_every_n_steps=cfg.steps,
            save_top_k=1,
        ),
        loss={k: v for k, v in student.items() if k != "label"},
    )


def _launch(train_cfg: Any, name: str, started: float) -> tuple[subprocess.Popen[bytes], Path]:
    """Start ``nemo-dcod train`` on ``train_cfg`` (saved as ``logs/train_<name>.yaml``) under torchrun."""
    _check(train_cfg, f"train ({name})")
    run_dir = Path(train_cfg.run_dir)
    # Beside the train run, not in it: NeMoLogger moves what it finds in a run directory to run_<n>/.
    logs = run_dir.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    config_path = logs / f"train_{name}.yaml"
    config_path.write_text(f"# nemo-dcod train --config {config_path}\n" + to_yaml(train_cfg))
    log_path = logs / f"train_{name}.log"
    # torchrun starts every rank at once; plain `nemo-dcod train trainer.devices=N` would have
    # Lightning start rank 1 only after rank 0 has imported NeMo (~15-30 s more on 2 cores).
    ranks = train_cfg.trainer.devices
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd += ["-m", "nemo_dcod.cli", "train", "--config", str(config_path)]
    # One thread per rank: the ranks of both students share the machine's cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    _log(
        f"train {name}: {train_cfg.trainer.max_steps} steps, "
        f"TP={train_cfg.parallel.tensor_model_parallel_size}, log {log_path}",
        started,
    )
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, log_path


def _finish(proc: subprocess.Popen[bytes], log_path: Path, run_dir: Path, name: str) -> Path:
    """Wait for a training; its final checkpoint."""
    from nemo_dcod.train.checkpoints import newest_complete_checkpoint

    code = proc.wait()
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise DemoError(f"train {name} failed (exit {code}); last lines of {log_path}:\n{tail}")
    checkpoint = newest_complete_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise DemoError(f"train {name}: no complete checkpoint in {run_dir / 'checkpoints'}; see {log_path}")
    return checkpoint


def _train_all(
    cfg: DemoConfig, run_dir: Path, store: Path, vocab_size: int, started: float
) -> dict[str, Path]:
    """Every student, side by side (their start-up, checkpoint writing and shutdown overlap)."""
    running = {}
    try:
        for student in cfg.students:
            label = label_of(student)
            train_cfg = _train_config(cfg, run_dir / label, store, vocab_size, student)
            running[label] = (*_launch(train_cfg, label, started), run_dir / label)
        return {name: _finish(proc, log, d, name) for name, (proc, log, d) in running.items()}
    finally:
        for proc, _, _ in running.values():
            if proc.poll() is None:  # a sibling failed: do not leave this one running
                proc.terminate()
                proc.wait()


def _export(checkpoint: Path, hf_out: Path, tokenizer: Path, prompts: list[str]) -> dict[str, Any]:
    from nemo_dcod.convert.config import ExportConfig, VerifySection
    from nemo_dcod.convert.hf_export import run_export

    export_cfg = ExportConfig(
        checkpoint=str(checkpoint),
        hf_out=str(hf_out),
        tokenizer=str(tokenizer),
        overwrite=True,
        verify=VerifySection(prompts=prompts, random_rows=1, seq_length=32),
    )
    _check(export_cfg, "export")
    report: dict[str, Any] = run_export(export_cfg)
    return report


def _eval(
    cfg: DemoConfig, models: dict[str, Path], benchmark: Path, out_dir: Path, max_new_tokens: int
) -> dict[str, Any]:
    from nemo_dcod.eval.config import BenchmarkEntry, EvalConfig, GradingSection, ModelEntry, SamplingSection
    from nemo_dcod.eval.run import run_eval

    eval_cfg = EvalConfig(
        models=[ModelEntry(path=str(path), label=name) for name, path in models.items()],
        benchmarks=[BenchmarkEntry(name="heldout", format="gsm8k", path=str(benchmark))],
        prompt_template="{problem}",
        sampling=SamplingSection(temperature=0.0, max_new_tokens=max_new_tokens, seed=cfg.seed),
        grading=GradingSection(extraction="gsm8k", fallback=False, grader="string"),
        backend="transformers",
        batch_size=64,
        device="cpu",
        progress=False,
        plot=False,
        out_dir=str(out_dir),
    )
    _check(eval_cfg, "eval")
    results: dict[str, Any] = run_eval(eval_cfg)
    return results


def _measure(
    cfg: DemoConfig, hf_dir: Path, teacher: ProgramTeacher, problems: list[Problem]
) -> dict[str, Any]:
    """ExAccErr and forced-style accuracy of one exported student (loaded once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_dcod.demo.exposure import exposure_bias, hf_logprob_fn
    from nemo_dcod.demo.skill import forced_style_accuracy
    from nemo_dcod.eval.generation import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    chosen = problems[: cfg.exposure_samples]
    _, prompts = encode_prompts(tokenizer, [p.text for p in chosen])  # exactly eval's prompts
    exposure = exposure_bias(hf_logprob_fn(model), teacher, chosen, prompts, seed=cfg.seed)
    max_new = teacher.max_response_tokens(cfg.num_ops) + 2
    forced = {style: forced_style_accuracy(model, tokenizer, problems, style, max_new) for style in STYLES}
    return {"exposure": asdict(exposure), "forced_style_accuracy": forced}


# ------------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------------


def _task(cfg: DemoConfig, run_dir: Path, started: float) -> dict[str, Any]:
    """Steps 1-2: the task's vocabulary and tokenizer, the teacher's traces, the held-out problems."""
    vocab = TaskVocab(cfg.modulus)
    tokenizer_dir = run_dir / "tokenizer"
    tokenizer = build_tokenizer(vocab, tokenizer_dir)
    rng = random.Random(cfg.seed)
    train_problems = sample_problems(cfg.num_train_problems, cfg.num_ops, cfg.modulus, rng)
    eval_problems = sample_problems(
        cfg.num_eval_problems, cfg.num_ops, cfg.modulus, rng, exclude=set(train_problems)
    )
    teacher = ProgramTeacher(vocab, cfg.shortcut_prob, cfg.step_error, cfg.shortcut_error, cfg.teacher_noise)
    sample_rng = np.random.default_rng(cfg.seed)
    traces = [teacher.sample(p, sample_rng) for p in train_problems]
    _write_traces(traces, run_dir / "traces.jsonl")
    _write_benchmark(eval_problems, run_dir / "heldout.jsonl")
    stats = _teacher_stats(traces)
    _log(
        f"teacher: {len(traces)} traces, {stats['correct']} correct; shortcut share after the filter "
        f"{stats['shortcut_share_after_filter']:.2f}",
        started,
    )
    return {
        "vocab": vocab,
        "tokenizer": tokenizer,
        "tokenizer_dir": tokenizer_dir,
        "teacher": teacher,
        "eval_problems": eval_problems,
        "teacher_stats": stats,
    }


def _export_all(
    checkpoints: dict[str, Path], run_dir: Path, task: dict[str, Any], started: float
) -> dict[str, Path]:
    """Step 5: every student to Hugging Face, verified on task prompts (export's defaults are English)."""
    prompts = [
        task["tokenizer"].apply_chat_template(
            [{"role": "user", "content": p.text}], tokenize=False, add_generation_prompt=True
        )
        for p in task["eval_problems"][:2]
    ]
    exports: dict[str, Path] = {}
    for name, checkpoint in checkpoints.items():
        exports[name] = run_dir / "hf" / name
        _export(checkpoint, exports[name], task["tokenizer_dir"], prompts)
        _log(f"export {name}: {exports[name]}", started)
    return exports


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the whole demo; returns the summary (also written to ``<run_dir>/summary.json``).

    Raises:
        DemoError: a stage failed (the message names it and its log), run_dir holds something
            other than an earlier demo run, or the students did not start identical (their
            losses differ while every one of them trains with λ = 0).
    """
    from nemo_dcod.demo.report import write_report

    started = time.perf_counter()
    requested = cfg
    cfg = cfg.resolved()
    run_dir = Path(cfg.run_dir).resolve()
    _fresh_run_dir(run_dir)
    (run_dir / "config.yaml").write_text(
        "# nemo-dcod demo --config " + str(run_dir / "config.yaml") + "\n" + to_yaml(requested)
    )
    if cfg.reduced:
        sizes = ("num_train_problems", "num_eval_problems", "steps", "exposure_samples")
        _log("reduced (CI) sizes: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in sizes), started)
    task = _task(cfg, run_dir, started)  # 1-2
    store = run_dir / "store"  # 3
    prepare_report = _prepare(cfg, run_dir / "traces.jsonl", task["tokenizer_dir"], store)
    _log(f"prepare: store {store}", started)
    checkpoints = _train_all(cfg, run_dir, store, len(task["vocab"]), started)  # 4, one initialisation
    exports = _export_all(checkpoints, run_dir, task, started)  # 5
    max_new = task["teacher"].max_response_tokens(cfg.num_ops) + 4  # 6
    eval_results = _eval(cfg, exports, run_dir / "heldout.jsonl", run_dir / "eval", max_new)
    _log(f"eval: {run_dir / 'eval'}", started)
    measured = {  # 7
        name: _measure(cfg, path, task["teacher"], task["eval_problems"]) for name, path in exports.items()
    }
    _log("exposure bias and forced-style accuracy measured", started)
    summary = write_report(  # 8
        run_dir,
        cfg,
        teacher_stats=task["teacher_stats"],
        prepare_report=prepare_report,
        checkpoints=checkpoints,
        exports=exports,
        eval_results=eval_results,
        measured=measured,
        wall_s=time.perf_counter() - started,
    )
    same = summary["identical_start"]
    if not same["identical"]:
        raise DemoError(
            f"the students did not start identical: their losses agree over {same['equal_steps']} steps, "
            f"but all of them trained plain SFT (λ = 0) for {same['expected_equal_steps']} (step 1: "
            f"{same['step1_losses']}): the comparison is void. See {run_dir / 'summary.json'}."
        )
    return summary
