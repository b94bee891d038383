"""``nemo-dcod demo``: the embedded default, a two-student study on one seed.

The demo is :func:`~nemo_dcod.study.run.run_study` with the demo's values (:class:`DemoConfig`):
the ``styles`` task, one seed, one start (``start``: random or warm; one checkpoint, loaded by
both students), the
students at ``tensor_model_parallel_size`` (2: two gloo processes each, both students side by
side), greedy eval, forced-style skill and ExAccErr. On top of the study it keeps two promises of
the demo: a run directory is replaced by the next demo run (never a folder the demo did not make),
and the students' losses must agree exactly while every one of them trains with λ = 0, or the
comparison is void and the demo fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from nemo_dcod.config import to_yaml
from nemo_dcod.demo.config import DemoConfig
from nemo_dcod.losses.registry import label_of
from nemo_dcod.study.config import StudyError

__all__ = ["DemoError", "fresh_run_dir", "run_demo", "study_of", "verdict"]

_MARKER = "demo.json"
"""Written first into a demo's run directory: what marks it as safe to replace on the next run."""


class DemoError(StudyError):
    """A demo stage failed; the message names the stage and its log."""


def fresh_run_dir(run_dir: Path) -> None:
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
    from nemo_dcod.study.run import MARKER

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / _MARKER).write_text(json.dumps({"created_by": "nemo-dcod demo"}) + "\n")
    (run_dir / MARKER).write_text(json.dumps({"created_by": "nemo-dcod demo"}) + "\n")  # a study's folder


def study_of(cfg: DemoConfig, run_dir: Path) -> Any:
    """The :class:`~nemo_dcod.study.config.StudyConfig` the demo runs."""
    from nemo_dcod.study.config import (
        EvaluationSection,
        StartSection,
        StudyConfig,
        TaskSection,
        TrainingSection,
    )

    return StudyConfig(
        name="demo",
        run_dir=str(run_dir),
        seeds=[cfg.seed],
        baseline=label_of(cfg.students[0]),
        reduced=cfg.reduced,
        parallel=max(len(cfg.students), 1),  # side by side, as they always were
        task=TaskSection(
            preset="styles",
            num_ops=cfg.num_ops,
            modulus=cfg.modulus,
            num_train_problems=cfg.num_train_problems,
            num_eval_problems=cfg.num_eval_problems,
            shortcut_prob=cfg.shortcut_prob,
            step_error=cfg.step_error,
            shortcut_error=cfg.shortcut_error,
            teacher_noise=cfg.teacher_noise,
            seq_length=cfg.seq_length,
        ),
        start=StartSection(kind=cfg.start),
        training=TrainingSection(
            steps=cfg.steps,
            global_batch_size=cfg.global_batch_size,
            lr=cfg.lr,
            hidden_size=cfg.hidden_size,
            ffn_hidden_size=cfg.ffn_hidden_size,
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            topk=8,
        ),
        evaluation=EvaluationSection(num_samples=0, exposure_samples=cfg.exposure_samples),
        students=list(cfg.students),
    )


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the study's summary (``<run_dir>/report_demo/summary.json``).

    Raises:
        DemoError: a job failed, run_dir holds something other than an earlier demo run, or the
            students did not start identical (their losses differ while all of them train with
            λ = 0).
    """
    from nemo_dcod.study.run import run_study

    run_dir = Path(cfg.run_dir).resolve()
    fresh_run_dir(run_dir)
    (run_dir / "config.yaml").write_text(
        "# nemo-dcod demo --config " + str(run_dir / "config.yaml") + "\n" + to_yaml(cfg)
    )
    try:
        summary = run_study(study_of(cfg, run_dir))
    except StudyError as exc:
        raise DemoError(str(exc)) from exc
    for name, same in summary["identical_start"].items():
        if not same["identical"]:
            raise DemoError(
                f"{name}: the students did not start identical: their losses agree over "
                f"{same['equal_steps']} steps, but all of them trained with λ = 0 for "
                f"{same['expected_equal_steps']} (step 1: {same['step1_losses']}): the comparison is void. "
                f"See {run_dir / 'report_demo' / 'summary.json'}."
            )
    print(verdict(summary), flush=True)
    return summary


def verdict(summary: dict[str, Any]) -> str:
    """What the demo's one seed shows, with its caveats (printed at its end).

    Every student is compared with the baseline on greedy accuracy; the comparison is only called
    meaningful when the baseline learned the stepwise skill (forced-stepwise accuracy >= 90%: the
    method has something to act on).
    """
    base = summary["baseline"]
    students = summary["students"]
    seed = str(summary["seeds"][0])
    b = students[base]["per_seed"][seed]
    lines = ["", "## What this run shows (one seed, a synthetic task)", ""]
    skill = b.get("forced_stepwise_percent")
    if skill is None or skill < 90:
        lines.append(
            f"- {base}'s forced-stepwise skill is {skill}% (< 90%): the student never learned what the "
            "method could act on, so this run compares nothing; see docs/results.md for the studies."
        )
        return "\n".join(lines)
    for label, student in students.items():
        if label == base:
            continue
        r = student["per_seed"][seed]
        delta = r["accuracy_percent"] - b["accuracy_percent"]
        word = "beats" if delta >= 5 else "trails" if delta <= -5 else "matches"
        lines.append(
            f"- {label} {word} {base}: greedy accuracy {r['accuracy_percent']:.1f}% vs "
            f"{b['accuracy_percent']:.1f}% ({delta:+.1f}); shortcut chosen "
            f"{r['shortcut_share_percent']:.0f}% vs {b['shortcut_share_percent']:.0f}%; "
            f"forced-stepwise skill {r['forced_stepwise_percent']:.1f}% vs {skill:.1f}%."
        )
    lines += [
        "- Caveats: one seed, no interval; a synthetic task whose teacher writes a shortcut the student "
        "cannot execute. The held-out evidence (5 seeds) and the long-chain task, where DisCorD does "
        "not beat SFT, are in docs/results.md.",
    ]
    return "\n".join(lines)
