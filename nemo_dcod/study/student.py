"""One student on one seed: train from the seed's start, export, evaluate, measure, summarise.

Every stage is the real one, called through its config dataclass: ``nemo-dcod train`` in a
subprocess (:mod:`.launch`), :func:`~nemo_dcod.convert.hf_export.run_export` (logit parity
verified), :func:`~nemo_dcod.eval.run.run_eval` (greedy pass@1, and sampled avg@k), then on the
exported Hugging Face model the forced-style skill (:mod:`nemo_dcod.demo.skill`) and ExAccErr
(:mod:`nemo_dcod.demo.exposure`). The student's ``summary.json`` is written last, atomically: a
student with one is finished, and a rerun of the study never trains it again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from nemo_dcod.study.config import StudyConfig
from nemo_dcod.study.launch import check, train_config, train_run

__all__ = ["SUMMARY_FILE", "read_summary", "run_student", "training_figures"]

SUMMARY_FILE = "summary.json"


def _export(checkpoint: Path, hf_out: Path, tokenizer: Path, prompts: list[str]) -> None:
    from nemo_dcod.convert.config import ExportConfig, VerifySection
    from nemo_dcod.convert.hf_export import run_export

    cfg = ExportConfig(
        checkpoint=str(checkpoint),
        hf_out=str(hf_out),
        tokenizer=str(tokenizer),
        overwrite=True,
        verify=VerifySection(prompts=prompts, random_rows=1, seq_length=32),
    )
    check(cfg, "export")
    run_export(cfg)


def _verify_prompts(tokenizer_dir: Path, problems: list[str]) -> list[str]:
    """Task prompts as the chat template renders them (export's default prompts are English)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in problems
    ]


def _eval(
    hf: Path, label: str, benchmark: Path, out_dir: Path, max_new: int, seed: int, k: int, temperature: float
) -> dict[str, Any]:
    """``heldout``'s results of ``hf`` (greedy when ``k`` is 1 and ``temperature`` 0, else avg@k)."""
    from nemo_dcod.eval.config import BenchmarkEntry, EvalConfig, GradingSection, ModelEntry, SamplingSection
    from nemo_dcod.eval.run import run_eval

    cfg = EvalConfig(
        models=[ModelEntry(path=str(hf), label=label)],
        benchmarks=[BenchmarkEntry(name="heldout", format="gsm8k", path=str(benchmark))],
        prompt_template="{problem}",
        sampling=SamplingSection(temperature=temperature, num_samples=k, max_new_tokens=max_new, seed=seed),
        grading=GradingSection(extraction="gsm8k", fallback=False, grader="string"),
        backend="transformers",
        batch_size=64,
        device="cpu",
        progress=False,
        plot=False,
        out_dir=str(out_dir),
    )
    check(cfg, "eval")
    bench: dict[str, Any] = run_eval(cfg)["models"][label]["benchmarks"]["heldout"]
    return bench


def style_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of greedy answers per style (the completion's first word) and accuracy within each."""
    by_style: dict[str, list[bool]] = {"stepwise": [], "shortcut": []}
    for record in records:
        sample = record["samples"][0]
        words = str(sample.get("completion", "")).split()
        if words and words[0] in by_style:
            by_style[words[0]].append(bool(sample["correct"]))
    n = len(records)

    def within(style: str) -> float | None:
        hits = by_style[style]
        return 100.0 * sum(hits) / len(hits) if hits else None

    return {
        "shortcut_share_percent": 100.0 * len(by_style["shortcut"]) / n if n else None,
        "stepwise_share_percent": 100.0 * len(by_style["stepwise"]) / n if n else None,
        "accuracy_stepwise_percent": within("stepwise"),
        "accuracy_shortcut_percent": within("shortcut"),
    }


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def training_figures(metrics_path: Path) -> dict[str, Any]:
    """From a run's ``metrics.jsonl``: the loss curve, λ, and the token weights' diagnostics.

    The weight figures (ESS, clipped fraction, gate ESS, the guard, the histogram) are over the
    steps whose weights are on: λ > 0 for DisCorD, every step for the other losses.
    """
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    weighted = [r for r in records if r.get("lambda", 1.0) > 0]
    hists = [r["weight_hist"] for r in weighted if "weight_hist" in r]
    guard = [r["guard_scale"] for r in weighted if r.get("guard_scale") is not None]
    return {
        "final_train_loss": records[-1]["loss"] if records else None,
        "losses": [r["loss"] for r in records],
        "lambdas": [float(r.get("lambda", 0.0)) for r in records],
        "weighted_steps": len(weighted),
        "ess_mean": _mean([r.get("ess") for r in weighted]),
        "clip_fraction_mean": _mean([r.get("clip_fraction") for r in weighted]),
        "gate_ess_mean": _mean([r.get("gate_ess") for r in weighted]),
        "guard_acted_fraction": sum(g < 1.0 for g in guard) / len(guard) if guard else None,
        "guard_scale_mean": _mean(guard),
        "weight_hist": [float(sum(c)) for c in zip(*hists, strict=True)] if hists else None,
    }


def _measure(cfg: StudyConfig, hf: Path, seed: int, styles: tuple[str, ...]) -> dict[str, Any]:
    """ExAccErr and its parts, and the forced-style accuracies, of the exported student."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_dcod.demo.exposure import exposure_bias, hf_logprob_fn
    from nemo_dcod.demo.skill import forced_style_accuracy
    from nemo_dcod.eval.generation import encode_prompts
    from nemo_dcod.study.tasks import make_task

    task = make_task(cfg.task, seed)
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    chosen = task.eval_problems[: cfg.evaluation.exposure_samples]
    _, prompts = encode_prompts(tokenizer, [p.text for p in chosen])  # exactly eval's prompts
    exposure = asdict(exposure_bias(hf_logprob_fn(model), task.teacher, chosen, prompts, seed=seed))
    assert cfg.task.num_ops is not None
    max_new = task.teacher.max_response_tokens(cfg.task.num_ops) + 2
    forced = {
        s: 100.0 * forced_style_accuracy(model, tokenizer, task.eval_problems, s, max_new) for s in styles
    }
    return {
        "forced_stepwise_percent": forced.get("stepwise"),
        "forced_shortcut_percent": forced.get("shortcut"),
        "kl_teacher_prefixes": exposure["epsilon"],
        "exposure_r": exposure["r"],
        "exposure_l_eps": exposure["length"] * exposure["epsilon"],
        "exaccerr_percent": exposure["exaccerr_percent"],
        "exposure": exposure,
    }


def _train(cfg: StudyConfig, seed: int, section: dict[str, Any], where: Path, prep: dict[str, Any]) -> Path:
    """``nemo-dcod train`` of the student from the seed's start; its final checkpoint."""
    tr, task = cfg.training, cfg.task
    assert task.seq_length is not None
    run = train_config(
        where / "train",
        Path(prep["store"]),
        seed=seed,
        vocab_size=int(prep["vocab_size"]),
        seq_length=task.seq_length,
        steps=tr.steps,
        global_batch_size=tr.global_batch_size,
        lr=tr.lr,
        tp=tr.tensor_model_parallel_size,
        loss={k: v for k, v in section.items() if k != "label"},
        init_from=Path(prep["start"]["checkpoint"]),
        shuffle=tr.shuffle,
    )
    return train_run(run, where / "logs", "train")


def _accuracies(
    cfg: StudyConfig, label: str, seed: int, where: Path, prep: dict[str, Any], max_new: int
) -> dict[str, Any]:
    """Greedy pass@1 (and its style figures) and sampled avg@k of the exported student."""
    heldout, ev = Path(prep["heldout"]), cfg.evaluation
    greedy = _eval(where / "hf", label, heldout, where / "eval", max_new, seed, 1, 0.0)
    sampled = None
    if ev.num_samples:
        out = where / "eval_sampled"
        sampled = _eval(where / "hf", label, heldout, out, max_new, seed, ev.num_samples, ev.temperature)
    return {
        "accuracy_percent": 100.0 * greedy["score"],
        "accuracy_stderr_percent": 100.0 * greedy["stderr"] if greedy["stderr"] is not None else None,
        "num_eval_problems": greedy["n"],
        "sampled_accuracy_percent": 100.0 * sampled["score"] if sampled else None,
        "sampled_pass_at_k_percent": 100.0 * sampled["pass_at_k"] if sampled else None,
        "sampled_k": ev.num_samples,
        **style_figures(greedy["records"]),
    }


def run_student(
    cfg: StudyConfig, seed: int, section: dict[str, Any], where: Path, prep: dict[str, Any]
) -> dict[str, Any]:
    """Train, export, evaluate and measure one student; write its ``summary.json`` last.

    Args:
        cfg: the resolved study config.
        seed: the seed (its problems, data order and samplers).
        section: the student's loss section (with its ``label``).
        where: the student's folder (made here; what it holds is replaced).
        prep: the seed's ``prep.json`` (:mod:`.seeds`).
    """
    from nemo_dcod.data.store import write_json_atomic
    from nemo_dcod.losses.registry import label_of
    from nemo_dcod.study.tasks import make_task

    started = time.perf_counter()
    label = label_of(section)
    assert cfg.task.num_ops is not None
    checkpoint = _train(cfg, seed, section, where, prep)
    seed_task = make_task(cfg.task, seed)
    tokenizer_dir = Path(prep["tokenizer"])
    prompts = _verify_prompts(tokenizer_dir, [p.text for p in seed_task.eval_problems[:2]])
    _export(checkpoint, where / "hf", tokenizer_dir, prompts)
    max_new = seed_task.teacher.max_response_tokens(cfg.task.num_ops) + 4
    accuracies = _accuracies(cfg, label, seed, where, prep, max_new)
    summary: dict[str, Any] = {
        "label": label,
        "seed": seed,
        "loss": section,
        **accuracies,
        **_measure(cfg, where / "hf", seed, seed_task.styles),
        **training_figures(where / "train" / "metrics.jsonl"),
        "start": prep["start"]["kind"],
        "paths": {
            "train_dir": str(where / "train"),
            "checkpoint": str(checkpoint),
            "hf_export": str(where / "hf"),
            "eval_results": str(where / "eval" / "results.json"),
            "eval_sampled_results": str(where / "eval_sampled" / "results.json")
            if accuracies["sampled_accuracy_percent"] is not None
            else None,
            "train_log": str(where / "logs" / "train.log"),
        },
    }
    summary["wall_s"] = time.perf_counter() - started
    write_json_atomic(where / SUMMARY_FILE, summary)
    return summary


def read_summary(where: Path) -> dict[str, Any] | None:
    """A finished student's summary; None when it has none (unfinished or never run)."""
    try:
        summary: dict[str, Any] = json.loads((where / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary
