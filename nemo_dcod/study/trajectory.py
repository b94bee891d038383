"""Where a student's skill and choice go during training, and where DisCorD's weight mass goes.

``python -m nemo_dcod.study.trajectory --report <summary.json> --labels sft discord_t05 --every 100``
(``--set data.shuffle=false``: the same students retrained with a changed training setting)

A study keeps each student's final checkpoint only. This tool retrains chosen students of a
finished study (the ``styles`` or the ``long_chain`` task) exactly as the study trained them (their
own ``config.yaml``: same start, data order and seed; deterministic on one machine, which it checks
against the study's per-step losses), saving every ``--every`` steps, and measures every checkpoint.

On the **styles** task:

* **choice**: the share of held-out problems whose greedy first response word is ``shortcut``;
* **skill**: greedy accuracy with the first word forced to ``stepwise`` (:mod:`nemo_dcod.demo.skill`);
* **where the weight mass goes**: on the seed's filtered teacher traces (what the student trains
  on), the student's log-prob and DisCorD's weight (the label's own τ / variant / centring, at
  λ = 1, normalised over those traces) per token class: the style word, the stepwise lines'
  computed results, their copied operands, the shortcut's one computed result, the final answer,
  and the rest (operators, separators, end of turn). ``mass`` is the class's share of Σw,
  ``tokens`` its share of the tokens: mass above tokens means the weights favour the class.

On the **long_chain** task (one style, ``num_ops`` stepwise lines ``a op b = r ;``):

* **accuracy**: greedy (unforced) accuracy on held-out problems, and where the greedy solutions
  go wrong, judged line by line on the student's *own* prefix (:func:`line_errors`): a wrong table
  result, a wrongly carried operand, a wrongly copied prompt operand or operator, a broken layout;
  per line, and the line of the first error;
* **where the weight mass goes**, as above, per :data:`LONG_CHAIN_CLASSES`: results of the first
  and the second half of the chain, the carried operand (the previous line's result written again),
  what is copied from the prompt (the start value, each operator and operand), the final answer,
  the rest; per line: the result's mean weight and log-prob; and how concentrated the weights are
  (the share of tokens *starved*, weight < 0.1, i.e. almost no gradient, and their classes).

Both: the training log at that step (loss, λ, ESS of the weights, capped fraction, Δ's mean and
spread, the gradient norm) and, over the steps since the previous checkpoint, the mean loss and the
largest gradient norm.

Output: ``trajectory.json`` and ``trajectory.md`` in ``--out``; the last line is a ``RESULT``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from nemo_dcod.study.trajectory_report import _LOGGED, LINE_ERRORS, STARVED, _markdown, _markdown_long_chain

__all__ = [
    "CLASSES",
    "LONG_CHAIN_CLASSES",
    "STARVED",
    "line_errors",
    "long_chain_classes",
    "main",
    "token_classes",
    "trajectory_of",
]

CLASSES = ("style", "stepwise_result", "stepwise_copy", "shortcut_result", "answer", "other")
"""Token classes of a styles-task response (:func:`token_classes`)."""
LONG_CHAIN_CLASSES = (
    "style",
    "result_early",
    "result_late",
    "carried_copy",
    "prompt_copy",
    "answer",
    "other",
)
"""Token classes of a long-chain response (:func:`long_chain_classes`)."""


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


def long_chain_classes(token_ids: list[int], num_ops: int, answer_marker: int) -> list[str]:
    """The class of each response token of a long-chain (stepwise) trace.

    Line i (0-based) is ``a op b = r ;`` at response positions 1 + 6i .. 6 + 6i: ``a`` is the start
    value copied from the prompt on line 0 (``prompt_copy``) and the previous line's result carried
    over afterwards (``carried_copy``); ``op`` and ``b`` are copied from the prompt; ``r`` is
    ``result_early`` on the first ⌈num_ops/2⌉ lines, ``result_late`` after. The token after ``####``
    is the ``answer``; position 0 (the style word) is ``style``; the rest is ``other``.
    """
    classes = ["other"] * len(token_ids)
    if token_ids:
        classes[0] = "style"
    early = (num_ops + 1) // 2
    for i in range(num_ops):
        base = 1 + 6 * i
        for pos, name in (
            (base, "prompt_copy" if i == 0 else "carried_copy"),
            (base + 1, "prompt_copy"),
            (base + 2, "prompt_copy"),
            (base + 4, "result_early" if i < early else "result_late"),
        ):
            if pos < len(token_ids):
                classes[pos] = name
    if answer_marker in token_ids:
        after = token_ids.index(answer_marker) + 1
        if after < len(token_ids):
            classes[after] = "answer"
    return classes


def line_errors(words: list[str], problem: Any) -> list[str | None]:
    """What is wrong in each line of a stepwise solution, judged on the solution's own prefix.

    Args:
        words: the response words after the style word (``a op b = r ; ... #### x``).
        problem: the :class:`~nemo_dcod.demo.task.Problem` solved.

    Returns:
        One entry per operation of ``problem``: None (the line is right given what the solution
        wrote before it), ``layout`` (missing or malformed line; every later line too), ``carry``
        (``a`` is not the previous line's written result, or the start value on line 0), ``operand``
        (``op`` or ``b`` differs from the prompt's), ``table`` (``r`` is not ``a op b`` of the
        written ``a op b``). The first of these that applies is reported.
    """
    from nemo_dcod.demo.task import apply

    out: list[str | None] = []
    previous = str(problem.start)
    broken = False
    for i, (op, d) in enumerate(problem.ops):
        line = words[6 * i : 6 * i + 5]
        sep = words[6 * i + 5] if 6 * i + 5 < len(words) else None
        want_sep = ";" if i + 1 < len(problem.ops) else "####"
        if (
            broken
            or len(line) < 5
            or line[3] != "="
            or sep != want_sep
            or not (line[0].isdigit() and line[2].isdigit() and line[4].isdigit())
            or line[1] not in ("+", "-")
        ):
            broken = True
            out.append("layout")
            continue
        a, o, b, r = int(line[0]), line[1], int(line[2]), int(line[4])
        if line[0] != previous:
            out.append("carry")
        elif (o, b) != (op, d):
            out.append("operand")
        elif r != apply(a, o, b, problem.modulus):
            out.append("table")
        else:
            out.append(None)
        previous = line[4]
    return out


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


def _weights(hf: Path, records: list[dict[str, Any]], loss_section: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The student's log-probs on ``records`` and DisCorD's weights at λ = 1 (the label's τ, variant,
    centring, clip, window), normalised over the records: (inputs, weights [n, T], mask [n, T])."""
    import torch

    from nemo_dcod.losses import build_loss
    from nemo_dcod.study.choice import _inputs

    inputs = _inputs(hf, records)
    params = {k: v for k, v in loss_section.items() if k in ("tau", "variant", "center", "clip", "window")}
    loss = build_loss("discord", **params)
    delta, _ = loss.delta(inputs)
    mask = inputs.mask
    n = mask.sum()
    b = float((delta * mask).sum() / n) if loss.center else 0.0
    g = torch.sigmoid((delta - b) / loss.tau)
    w = torch.where(mask, g / g[mask].mean(), torch.zeros_like(g))
    return inputs, w, mask


def _class_stats(
    class_rows: list[list[str]], names: tuple[str, ...], inputs: Any, w: Any, mask: Any
) -> dict[str, dict[str, float]]:
    """Per token class: its share of the tokens and of Σw, mean weight, mean log-probs, starved share."""
    import torch

    n = float(mask.sum())
    total_w = float(w[mask].sum())
    per_class: dict[str, dict[str, float]] = {}
    for name in names:
        sel = torch.zeros_like(mask)
        for i, row in enumerate(class_rows):
            for t, c in enumerate(row):
                sel[i, t] = c == name
        sel &= mask
        count = int(sel.sum())
        if count == 0:
            continue
        per_class[name] = {
            "tokens": count / n,
            "mass": float(w[sel].sum()) / total_w,
            "mean_weight": float(w[sel].mean()),
            "starved": float((w[sel] < STARVED).double().mean()),
            "student_logprob": float(inputs.student_logprobs[sel].mean()),
            "teacher_logprob": float(inputs.teacher_logprobs[sel].mean()),
        }
    return per_class


def _measure_checkpoint(
    hf: Path,
    records: list[dict[str, Any]],
    loss_section: dict[str, Any],
    problems: list[Any],
    num_ops: int,
    max_new: int,
) -> dict[str, Any]:
    """Choice, forced-stepwise skill and per-class log-probs and weights of one exported checkpoint
    (styles task)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_dcod.demo.skill import forced_style_accuracy
    from nemo_dcod.eval.generation import encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    _, prompts = encode_prompts(tokenizer, [p.text for p in problems])
    with torch.no_grad():
        first = model(input_ids=torch.tensor(prompts)).logits[:, -1].argmax(-1)
    shortcut_id = tokenizer.convert_tokens_to_ids("shortcut")
    choice = 100.0 * float((first == shortcut_id).double().mean())
    skill = 100.0 * forced_style_accuracy(model, tokenizer, problems, "stepwise", max_new)

    inputs, w, mask = _weights(hf, records, loss_section)
    marker = tokenizer.convert_tokens_to_ids("####")
    class_rows = [token_classes(r["token_ids"], r["style"], num_ops, marker) for r in records]
    per_class = _class_stats(class_rows, CLASSES, inputs, w, mask)
    return {"shortcut_chosen_percent": choice, "forced_stepwise_percent": skill, "classes": per_class}


def _greedy_words(model: Any, tokenizer: Any, problems: list[Any], max_new: int) -> list[list[str]]:
    """Each problem's greedy (unforced) response as words."""
    from nemo_dcod.demo.skill import greedy_texts
    from nemo_dcod.eval.generation import encode_prompts

    _, prompts = encode_prompts(tokenizer, [p.text for p in problems])
    return [t.split() for t in greedy_texts(model, tokenizer, prompts, max_new)]


def _starved_by_class(class_rows: list[list[str]], mask: Any, starved: Any) -> dict[str, float]:
    """Each long-chain class's share of the starved tokens (``starved``: over ``mask``'s tokens)."""
    out: dict[str, float] = {}
    if not bool(starved.any()):
        return out
    pairs = zip(class_rows, mask, strict=True)
    names = [c for row, m in pairs for c, keep in zip(row, m, strict=False) if keep]
    total = int(starved.sum())
    for name in LONG_CHAIN_CLASSES:
        hits = sum(1 for c, s in zip(names, starved.tolist(), strict=True) if s and c == name)
        if hits:
            out[name] = hits / total
    return out


def _measure_long_chain(
    hf: Path,
    records: list[dict[str, Any]],
    loss_section: dict[str, Any],
    problems: list[Any],
    num_ops: int,
    max_new: int,
) -> dict[str, Any]:
    """Accuracy, where the greedy solutions go wrong, and where the weights go, of one exported
    checkpoint (long-chain task)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    responses = _greedy_words(model, tokenizer, problems, max_new)
    correct, stepwise = 0, 0
    per_line = {kind: [0] * num_ops for kind in LINE_ERRORS}
    first_error = [0] * (num_ops + 1)  # index num_ops: no error
    for words, problem in zip(responses, problems, strict=True):
        after = words[len(words) - words[::-1].index("####") :] if "####" in words else []
        correct += bool(after) and after[0] == str(problem.answer())
        stepwise += bool(words) and words[0] == "stepwise"
        errors = line_errors(words[1:], problem)
        for i, kind in enumerate(errors):
            if kind is not None:
                per_line[kind][i] += 1
        first_error[next((i for i, e in enumerate(errors) if e is not None), num_ops)] += 1
    n = len(problems)

    inputs, w, mask = _weights(hf, records, loss_section)
    marker = tokenizer.convert_tokens_to_ids("####")
    class_rows = [long_chain_classes(r["token_ids"], num_ops, marker) for r in records]
    per_class = _class_stats(class_rows, LONG_CHAIN_CLASSES, inputs, w, mask)
    lines = []
    for i in range(num_ops):
        pos = 1 + 6 * i + 4
        sel = mask[:, pos] if pos < mask.shape[1] else torch.zeros(mask.shape[0], dtype=torch.bool)
        if not bool(sel.any()):
            continue
        # the line's operator and operand, copied from the prompt (all traces reach them: pos > them)
        copy = w[sel][:, pos - 3 : pos - 1]
        lines.append(
            {
                "line": i + 1,
                "mean_weight": float(w[sel, pos].mean()),
                "starved": float((w[sel, pos] < STARVED).double().mean()),
                "student_logprob": float(inputs.student_logprobs[sel, pos].mean()),
                "copy_weight": float(copy.mean()),
                "copy_starved": float((copy < STARVED).double().mean()),
                "copy_logprob": float(inputs.student_logprobs[sel][:, pos - 3 : pos - 1].mean()),
            }
        )
    flat = w[mask]
    top = max(1, int(0.01 * flat.numel()))
    starved = flat < STARVED
    starved_by_class = _starved_by_class(class_rows, mask, starved)
    return {
        "accuracy_percent": 100.0 * correct / n,
        "stepwise_first_percent": 100.0 * stepwise / n,
        "line_error_percent": {k: [100.0 * x / n for x in v] for k, v in per_line.items()},
        "first_error_line_percent": [100.0 * x / n for x in first_error],
        "classes": per_class,
        "lines": lines,
        "weights": {
            "ess": float(flat.sum() ** 2 / (flat.numel() * (flat * flat).sum())),
            "starved_percent": 100.0 * float(starved.double().mean()),
            "top1_mass_percent": 100.0 * float(flat.topk(top).values.sum() / flat.sum()),
            "max": float(flat.max()),
            "starved_by_class": starved_by_class,
        },
    }


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
    long_chain = task_cfg.preset == "long_chain"
    measure = _measure_long_chain if long_chain else _measure_checkpoint
    points: list[dict[str, Any]] = []
    for checkpoint in [Path(prep["start"]["checkpoint"]), *checkpoints]:
        step = (
            0
            if checkpoint == Path(prep["start"]["checkpoint"])
            else int(checkpoint.name.split("step=")[1].split("-")[0]) + 1
        )
        hf = out / "hf" / f"step_{step}"
        if not (hf / "config.json").is_file():
            _export(checkpoint, hf, tokenizer_dir, prompts)
        point = measure(hf, kept, loss_section, problems, task_cfg.num_ops, max_new)
        rec = logged.get(step, {})
        point.update(step=step, loss=rec.get("loss"), lam=rec.get("lambda"), ess=rec.get("ess"))
        if long_chain:
            since = [logged[s] for s in logged if (points[-1]["step"] if points else 0) < s <= step]
            point["log"] = {
                **{k: rec.get(k) for k in _LOGGED},
                "window_mean_loss": sum(r["loss"] for r in since) / len(since) if since else None,
                "window_max_grad_norm": max((r["grad_norm"] for r in since), default=None),
            }
            said = (
                f"accuracy {point['accuracy_percent']:.1f}%, "
                f"starved {point['weights']['starved_percent']:.1f}%"
            )
        else:
            said = (
                f"shortcut {point['shortcut_chosen_percent']:.0f}% "
                f"forced stepwise {point['forced_stepwise_percent']:.0f}%"
            )
        points.append(point)
        print(f"[trajectory] seed {seed} {label} step {step}: {said}", flush=True)
    return {
        "label": label,
        "seed": seed,
        "overrides": list(overrides or []),
        "reproduces_study": same,
        "points": points,
    }


def main(argv: list[str] | None = None) -> int:
    """Measure the trajectories of a study's students; write trajectory.json / trajectory.md."""
    from nemo_dcod.study.config import TaskSection

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--report", required=True, help="a finished study's summary.json (styles or long_chain task)"
    )
    parser.add_argument("--labels", nargs="+", required=True, help="students to follow (their labels)")
    parser.add_argument(
        "--seeds", nargs="*", type=int, default=None, help="default: every seed of the report"
    )
    parser.add_argument("--every", type=int, default=100, help="steps between measured checkpoints")
    parser.add_argument("--problems", type=int, default=100, help="held-out problems for choice and skill")
    parser.add_argument("--traces", type=int, default=300, help="filtered teacher traces for the weights")
    parser.add_argument(
        "--tau",
        type=float,
        default=None,
        help="τ of the measured weights for every label (default: the label's own; 1 for non-DisCorD labels)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--set", nargs="*", default=[], help="train overrides key=value (e.g. data.shuffle=false)"
    )
    args = parser.parse_args(argv)
    summary = json.loads(Path(args.report).read_text())
    task_cfg = TaskSection(**summary["config"]["task"])
    if task_cfg.preset not in ("styles", "long_chain"):
        parser.error(
            f"task preset {task_cfg.preset!r}: token classes exist for the styles and long_chain tasks only"
        )
    render = _markdown_long_chain if task_cfg.preset == "long_chain" else _markdown
    out = Path(args.out)
    results = []
    for label in args.labels:
        runs, section = summary["students"][label]["per_seed"], summary["students"][label]["loss"]
        if args.tau is not None:
            section = {**section, "tau": args.tau}
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
            (out / "trajectory.md").write_text(render(results, args.every))
    print(render(results, args.every))
    key = "accuracy_percent" if task_cfg.preset == "long_chain" else "forced_stepwise_percent"
    finals = {f"{r['label']}_s{r['seed']}": r["points"][-1][key] for r in results}
    print("RESULT " + " ".join(f"{key.removesuffix('_percent')}_{k}={v:.1f}" for k, v in finals.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
