"""Where a student's skill and choice go during training, and where DisCorD's weight mass goes.

``python -m nemo_dcod.study.trajectory --report <summary.json> --labels sft discord_t05 --every 100``
(``--set data.shuffle=false``: the same students retrained with a changed training setting)

A study keeps each student's final checkpoint only. This tool retrains chosen students of a
finished styles-task study exactly as the study trained them (their own ``config.yaml``: same
start, data order and seed; deterministic on one machine, which it checks against the study's
per-step losses), saving every ``--every`` steps, and measures every checkpoint:

* **choice**: the share of held-out problems whose greedy first response word is ``shortcut``;
* **skill**: greedy accuracy with the first word forced to ``stepwise`` (:mod:`nemo_dcod.demo.skill`);
* **where the weight mass goes**: on the seed's filtered teacher traces (what the student trains
  on), the student's log-prob and DisCorD's weight (the label's own τ / variant / centring, at
  λ = 1, normalised over those traces) per token class: the style word, the stepwise lines'
  computed results, their copied operands, the shortcut's one computed result, the final answer,
  and the rest (operators, separators, end of turn). ``mass`` is the class's share of Σw,
  ``tokens`` its share of the tokens: mass above tokens means the weights favour the class.
* the training log at that step: loss, λ, ESS of the weights.

Output: ``trajectory.json`` and ``trajectory.md`` in ``--out``; the last line is a ``RESULT``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["CLASSES", "main", "token_classes", "trajectory_of"]

CLASSES = ("style", "stepwise_result", "stepwise_copy", "shortcut_result", "answer", "other")
"""Token classes of a styles-task response (:func:`token_classes`)."""


def token_classes(token_ids: list[int], style: str, num_ops: int, answer_marker: int) -> list[str]:
    """The class of each response token of a styles-task trace (see the module docstring).

    Stepwise: ``stepwise a op b = r ;`` per line (results at 1 + 6i + 4, operands at 1 + 6i and
    1 + 6i + 2); shortcut: ``shortcut <the problem> = r`` (result at 2·num_ops + 3); both end with
    ``#### answer`` and the end of turn.
    """
    classes = ["other"] * len(token_ids)
    if token_ids:
        classes[0] = "style"
    if style == "stepwise":
        for i in range(num_ops):
            for pos, name in (
                (1 + 6 * i + 4, "stepwise_result"),
                (1 + 6 * i, "stepwise_copy"),
                (3 + 6 * i, "stepwise_copy"),
            ):
                if pos < len(token_ids):
                    classes[pos] = name
    elif 2 * num_ops + 3 < len(token_ids):
        classes[2 * num_ops + 3] = "shortcut_result"
    if answer_marker in token_ids:
        after = token_ids.index(answer_marker) + 1
        if after < len(token_ids):
            classes[after] = "answer"
    return classes


def _retrain(run: dict[str, Any], every: int, out: Path, overrides: list[str]) -> tuple[Path, list[Path]]:
    """The student's training again (with ``overrides``), saving every ``every`` steps: (run dir,
    checkpoints by step)."""
    from nemo_dcod.config import load_config
    from nemo_dcod.study.launch import train_run
    from nemo_dcod.train.config import TrainConfig

    train_dir = out / "train"
    cfg = load_config(
        TrainConfig,
        Path(run["paths"]["train_dir"]) / "config.yaml",
        [
            f"run_dir={train_dir}",
            f"trainer.ckpt_every_n_steps={every}",
            "trainer.save_top_k=-1",
            "resume=false",
            *overrides,
        ],
    )
    if not (train_dir / "metrics.jsonl").is_file() or not list((train_dir / "checkpoints").glob("*-last")):
        train_run(cfg, out / "logs", "train")
    checkpoints = sorted(
        (
            p
            for p in (train_dir / "checkpoints").iterdir()
            if p.is_dir() and not p.name.endswith(("-last", "-unfinished"))
        ),
        key=lambda p: int(p.name.split("step=")[1].split("-")[0]),
    )
    return train_dir, checkpoints


def _measure_checkpoint(
    hf: Path,
    records: list[dict[str, Any]],
    loss_section: dict[str, Any],
    problems: list[Any],
    num_ops: int,
    max_new: int,
) -> dict[str, Any]:
    """Choice, forced-stepwise skill and per-class log-probs and weights of one exported checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_dcod.demo.skill import forced_style_accuracy
    from nemo_dcod.eval.generation import encode_prompts
    from nemo_dcod.losses import build_loss
    from nemo_dcod.study.choice import _inputs

    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    _, prompts = encode_prompts(tokenizer, [p.text for p in problems])
    with torch.no_grad():
        first = model(input_ids=torch.tensor(prompts)).logits[:, -1].argmax(-1)
    shortcut_id = tokenizer.convert_tokens_to_ids("shortcut")
    choice = 100.0 * float((first == shortcut_id).double().mean())
    skill = 100.0 * forced_style_accuracy(model, tokenizer, problems, "stepwise", max_new)

    inputs = _inputs(hf, records)
    params = {k: v for k, v in loss_section.items() if k in ("tau", "variant", "center", "clip", "window")}
    loss = build_loss("discord", **params)
    delta, _ = loss.delta(inputs)
    mask = inputs.mask
    n = mask.sum()
    b = float((delta * mask).sum() / n) if loss.center else 0.0
    g = torch.sigmoid((delta - b) / loss.tau)
    w = torch.where(mask, g / g[mask].mean(), torch.zeros_like(g))
    marker = tokenizer.convert_tokens_to_ids("####")
    per_class: dict[str, dict[str, float]] = {}
    class_rows = [token_classes(r["token_ids"], r["style"], num_ops, marker) for r in records]
    total_w = float(w[mask].sum())
    for name in CLASSES:
        sel = torch.zeros_like(mask)
        for i, row in enumerate(class_rows):
            for t, c in enumerate(row):
                sel[i, t] = c == name
        sel &= mask
        count = int(sel.sum())
        if count == 0:
            continue
        per_class[name] = {
            "tokens": count / float(n),
            "mass": float(w[sel].sum()) / total_w,
            "mean_weight": float(w[sel].mean()),
            "student_logprob": float(inputs.student_logprobs[sel].mean()),
            "teacher_logprob": float(inputs.teacher_logprobs[sel].mean()),
        }
    return {"shortcut_chosen_percent": choice, "forced_stepwise_percent": skill, "classes": per_class}


def trajectory_of(
    run: dict[str, Any],
    label: str,
    loss_section: dict[str, Any],
    seed: int,
    task_cfg: Any,
    every: int,
    num_problems: int,
    num_traces: int,
    out: Path,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Retrain one student (seed ``seed``) saving every ``every`` steps and measure each checkpoint."""
    import yaml

    from nemo_dcod.study.choice import _correct
    from nemo_dcod.study.student import _export, _verify_prompts
    from nemo_dcod.study.tasks import make_task

    train_dir, checkpoints = _retrain(run, every, out, list(overrides or []))
    cfg = yaml.safe_load((Path(run["paths"]["train_dir"]) / "config.yaml").read_text())
    prep = json.loads((Path(cfg["data"]["path"]).parent / "prep.json").read_text())
    records = [json.loads(x) for x in Path(prep["traces"]).read_text().splitlines()]
    kept = [r for r in records if _correct(r)][:num_traces]
    task = make_task(task_cfg, seed)
    problems = task.eval_problems[:num_problems]
    max_new = task.teacher.max_response_tokens(task_cfg.num_ops) + 2
    tokenizer_dir = Path(prep["tokenizer"])
    prompts = _verify_prompts(tokenizer_dir, [p.text for p in task.eval_problems[:2]])
    logged = {r["step"]: r for r in map(json.loads, (train_dir / "metrics.jsonl").read_text().splitlines())}
    study_logged = {
        r["step"]: r
        for r in map(json.loads, (Path(run["paths"]["train_dir"]) / "metrics.jsonl").read_text().splitlines())
    }
    same = all(logged[s]["loss"] == study_logged[s]["loss"] for s in study_logged if s in logged)
    points = []
    for checkpoint in [Path(prep["start"]["checkpoint"]), *checkpoints]:
        step = (
            0
            if checkpoint == Path(prep["start"]["checkpoint"])
            else int(checkpoint.name.split("step=")[1].split("-")[0]) + 1
        )
        hf = out / "hf" / f"step_{step}"
        if not (hf / "config.json").is_file():
            _export(checkpoint, hf, tokenizer_dir, prompts)
        point = _measure_checkpoint(hf, kept, loss_section, problems, task_cfg.num_ops, max_new)
        rec = logged.get(step, {})
        point.update(step=step, loss=rec.get("loss"), lam=rec.get("lambda"), ess=rec.get("ess"))
        points.append(point)
        print(
            f"[trajectory] seed {seed} {label} step {step}: shortcut {point['shortcut_chosen_percent']:.0f}% "
            f"forced stepwise {point['forced_stepwise_percent']:.0f}%",
            flush=True,
        )
    return {
        "label": label,
        "seed": seed,
        "overrides": list(overrides or []),
        "reproduces_study": same,
        "points": points,
    }


def _fmt(value: Any, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _markdown(results: list[dict[str, Any]], every: int) -> str:
    lines = [
        "# Skill, choice and DisCorD's weight mass over training",
        "",
        f"Every {every} steps (step 0: the start). Weights at λ = 1 with the label's τ, normalised over"
        " the seed's filtered traces; mass = the class's share of Σw, tokens = its share of the tokens.",
        "",
    ]
    for res in results:
        lines += [
            f"## {res['label']}, seed {res['seed']}"
            + (f", with {' '.join(res['overrides'])}" if res["overrides"] else "")
            + f" (the retraining's losses equal the study's: {'yes' if res['reproduces_study'] else 'no'})",
            "",
            "| step | λ | loss | ESS | shortcut chosen % | forced stepwise % | stepwise result: "
            "mass / tokens, lq | shortcut result: mass / tokens, lq | style: mass / tokens |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for p in res["points"]:
            c = p["classes"]

            def cell(name: str, lq: bool = True, c: dict[str, Any] = c) -> str:
                if name not in c:
                    return "—"
                x = c[name]
                return f"{x['mass']:.3f} / {x['tokens']:.3f}" + (
                    f", {x['student_logprob']:.2f}" if lq else ""
                )

            lines.append(
                f"| {p['step']} | {_fmt(p['lam'], '.2f')} | {_fmt(p['loss'], '.4f')} | "
                f"{_fmt(p['ess'], '.3f')} | "
                f"{p['shortcut_chosen_percent']:.1f} | {p['forced_stepwise_percent']:.1f} | "
                f"{cell('stepwise_result')} | {cell('shortcut_result')} | {cell('style', lq=False)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure the trajectories of a study's students; write trajectory.json / trajectory.md."""
    from nemo_dcod.study.config import TaskSection

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", required=True, help="a finished styles-task study's summary.json")
    parser.add_argument("--labels", nargs="+", required=True, help="students to follow (their labels)")
    parser.add_argument(
        "--seeds", nargs="*", type=int, default=None, help="default: every seed of the report"
    )
    parser.add_argument("--every", type=int, default=100, help="steps between measured checkpoints")
    parser.add_argument("--problems", type=int, default=100, help="held-out problems for choice and skill")
    parser.add_argument("--traces", type=int, default=300, help="filtered teacher traces for the weights")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--set", nargs="*", default=[], help="train overrides key=value (e.g. data.shuffle=false)"
    )
    args = parser.parse_args(argv)
    summary = json.loads(Path(args.report).read_text())
    task_cfg = TaskSection(**summary["config"]["task"])
    if task_cfg.preset != "styles":
        parser.error("the token classes are the styles task's: --report must be a styles-task study")
    out = Path(args.out)
    results = []
    for label in args.labels:
        runs, section = summary["students"][label]["per_seed"], summary["students"][label]["loss"]
        for seed_text, run in runs.items():
            seed = int(seed_text)
            if args.seeds and seed not in args.seeds:
                continue
            suffix = "-".join(x.replace("=", "_") for x in args.set)
            where = Path(run["paths"]["train_dir"]).parent / ("trajectory" + (f"-{suffix}" if suffix else ""))
            results.append(
                trajectory_of(
                    run,
                    label,
                    section,
                    seed,
                    task_cfg,
                    args.every,
                    args.problems,
                    args.traces,
                    where,
                    args.set,
                )
            )
            out.mkdir(parents=True, exist_ok=True)
            (out / "trajectory.json").write_text(json.dumps(results, indent=1) + "\n")
            (out / "trajectory.md").write_text(_markdown(results, args.every))
    print(_markdown(results, args.every))
    finals = {f"{r['label']}_s{r['seed']}": r["points"][-1]["forced_stepwise_percent"] for r in results}
    print("RESULT " + " ".join(f"forced_stepwise_{k}={v:.1f}" for k, v in finals.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
