"""The markdown tables of :mod:`nemo_dcod.study.trajectory` (split out of it for size)."""

from __future__ import annotations

import math
from typing import Any

STARVED = 0.1
"""A token whose DisCorD weight is below this gets (almost) no gradient: it is *starved*."""
LINE_ERRORS = ("table", "carry", "operand", "layout")
"""What can be wrong in a line of a greedy solution (:func:`nemo_dcod.study.trajectory.line_errors`)."""

_LOGGED = ("capped_fraction", "delta_mean", "delta_std", "g_mean", "gate_ess", "grad_norm", "lr")
"""Training-log fields kept per long-chain checkpoint (besides loss, λ and ESS)."""


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


def _markdown_long_chain(results: list[dict[str, Any]], every: int) -> str:
    lines = [
        "# Accuracy, errors and DisCorD's weight mass over training (long chain)",
        "",
        f"Every {every} steps (step 0: the start). Accuracy: greedy, held-out problems; errors judged"
        " line by line on the student's own prefix. Weights at λ = 1 with the label's τ, normalised"
        " over the seed's filtered traces; mass / tokens = the class's share of Σw / of the tokens;"
        f" starved = share of tokens with weight < {STARVED}. Log: the training log at the step"
        " (loss: mean since the previous checkpoint; grad: the largest gradient norm since then).",
        "",
    ]
    for res in results:
        head = (
            f"## {res['label']}, seed {res['seed']}"
            + (f", with {' '.join(res['overrides'])}" if res["overrides"] else "")
            + f" (the retraining's losses equal the study's: {'yes' if res['reproduces_study'] else 'no'})"
        )
        lines += [
            head,
            "",
            "| step | λ | loss | ESS | Δ mean / std | grad | accuracy % | first error at line 1..8 (%) |"
            " table / carry / operand / layout errors % | starved % | top-1% mass % |"
            " early results: mass / tokens, lq, starved | late results | carried copy | prompt copy |"
            " answer |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in res["points"]:
            c, log, wt = p["classes"], p.get("log", {}), p["weights"]

            def cell(name: str, c: dict[str, Any] = c) -> str:
                if name not in c:
                    return "—"
                x = c[name]
                share = f"{x['mass']:.3f} / {x['tokens']:.3f}"
                return f"{share}, {x['student_logprob']:.2f}, {100 * x['starved']:.1f}%"

            errs = " / ".join(f"{sum(p['line_error_percent'][k]):.1f}" for k in LINE_ERRORS)
            first = " ".join(f"{x:.0f}" for x in p["first_error_line_percent"][:-1])
            lines.append(
                f"| {p['step']} | {_fmt(p['lam'], '.2f')} | {_fmt(log.get('window_mean_loss'), '.4f')} | "
                f"{_fmt(p['ess'], '.3f')} | {_fmt(log.get('delta_mean'), '.2f')} / "
                f"{_fmt(log.get('delta_std'), '.2f')} | {_fmt(log.get('window_max_grad_norm'), '.2f')} | "
                f"{p['accuracy_percent']:.1f} | {first} | {errs} | {wt['starved_percent']:.1f} | "
                f"{wt['top1_mass_percent']:.1f} | {cell('result_early')} | {cell('result_late')} | "
                f"{cell('carried_copy')} | {cell('prompt_copy')} | {cell('answer')} |"
            )
        lines += [
            "",
            "Per line (1..8): the result token's mean log-prob on the teacher's traces, its mean weight,"
            " the same for the operator and operand the line copies from the prompt, and the greedy"
            " solutions' table and operand errors (%) on that line.",
            "",
            "| step | result lq per line | result weight per line | copied op/operand lq per line |"
            " copied op/operand weight per line | table errors % per line | operand errors % per line |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in res["points"]:
            lq = " ".join(f"{x['student_logprob']:.2f}" for x in p["lines"])
            weight = " ".join(f"{x['mean_weight']:.2f}" for x in p["lines"])
            copy_lq = " ".join(f"{x['copy_logprob']:.2f}" for x in p["lines"])
            copy_weight = " ".join(f"{x['copy_weight']:.2f}" for x in p["lines"])
            table = " ".join(f"{x:.0f}" for x in p["line_error_percent"]["table"])
            operand = " ".join(f"{x:.0f}" for x in p["line_error_percent"]["operand"])
            lines.append(
                f"| {p['step']} | {lq} | {weight} | {copy_lq} | {copy_weight} | {table} | {operand} |"
            )
        lines.append("")
    return "\n".join(lines)
