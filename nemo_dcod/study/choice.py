"""Why DisCorD's weights move a student's skill far more than its choice of style.

``python -m nemo_dcod.study.choice --report <report>/summary.json --label sft [--out DIR]``

**The choice is one token.** In the two-style task the style is the response's first word.
Greedy decoding takes the more probable one, and weighted cross-entropy drives the student's
first-token distribution to the *weighted* share of the styles among the traces:

    q(shortcut) -> s_w = Σ_{shortcut traces} w_0 / Σ_{traces} w_0        (w_0: the style token's weight)

With SFT (w = 1) s_w is the filtered data's share s (~0.6: the teacher prefers the shortcut), so
greedy picks the shortcut. The choice flips only if the weights bring s_w below 1/2, i.e. only
if the style token of a shortcut trace gets less weight than that of a stepwise one, by a factor
(1 - s)/s ≈ 0.65. Everything else the weights do (on the result tokens of the stepwise lines, the
student's *skill*) changes how well the chosen style is executed, not which one is chosen.

**What each aggregation gives the style token.** ``token``: Δ_0 = log q(style) - log p(style),
which is about the student's *style frequencies*, not about whether it can execute the style:
near 0 for both styles once q matches the data. ``prefix`` is causal: the first token's window
holds only itself, so it is ``token`` there. ``sequence`` (mean) carries the trace's downstream
deficit back to the style token, diluted by the trace's length; ``sum`` carries it undiluted but
adds every small deficit of a long trace (stepwise traces are ~2x as long as shortcut ones);
``centered`` subtracts the trace's mean, so a shortcut trace's bad result token *raises* its style
token's Δ; ``min`` gives every token the trace's worst one: a trace whose result token the student
cannot produce is gated as a whole.

**Two measurements** (written to ``choice.md`` / ``choice.json``):

1. The ``token`` variant's fixed point, analytically: with λ = 1, iterate q <- s_w(q), where the
   style tokens' Δ are log(q / p) and log((1 - q) / (1 - p)) (p the teacher's shortcut probability):
   small τ turns the small frequency mismatch into a runaway (mode-seeking) that flips the choice
   without the student being any better at the style it flips to.
2. Measured on trained students: the student's log-probs on its seed's filtered teacher traces,
   every variant's Δ by the registered functions (as training computes it), the gate at each τ,
   λ = 1: s_w, the weight ratio of the two styles' first tokens, and the mean weight on the tokens
   that carry the skill (stepwise result tokens; the shortcut's one result token).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["fixed_point", "main", "measure_seed", "weighted_shares"]

VARIANTS = ("token", "prefix", "sequence", "sum", "centered", "min")
TAUS = (0.25, 0.5, 1.0, 2.0)


def fixed_point(share: float, p_shortcut: float, tau: float, steps: int = 500) -> float:
    """The ``token`` variant's limit of q(shortcut) at λ = 1, from q = ``share`` (SFT's limit).

    Args:
        share: the shortcut's share among the filtered traces (SFT's limit of q).
        p_shortcut: the teacher's probability of the shortcut style word.
        tau: the gate's temperature.
    """
    q = share
    for _ in range(steps):
        g_sc = 1 / (1 + math.exp(-math.log(q / p_shortcut) / tau))
        g_sw = 1 / (1 + math.exp(-math.log((1 - q) / (1 - p_shortcut)) / tau))
        q = min(max(share * g_sc / (share * g_sc + (1 - share) * g_sw), 1e-9), 1 - 1e-9)
    return q


def _correct(record: dict[str, Any]) -> bool:
    words = str(record["output"]).split()
    if "####" not in words:
        return False
    after = len(words) - words[::-1].index("####")
    return after < len(words) and words[after] == str(record["answer"])


def _inputs(hf: Path, records: list[dict[str, Any]]) -> Any:
    """The student's log-probs on the traces' responses as :class:`LossInputs` (one trace per row)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_dcod.eval.generation import encode_prompts
    from nemo_dcod.losses import LossInputs

    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    _, prompts = encode_prompts(tokenizer, [r["question"] for r in records])
    width = max(len(r["token_ids"]) for r in records)
    n, start = len(records), len(prompts[0]) - 1
    ids = torch.full((n, len(prompts[0]) + width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(n, width)
    lp = torch.zeros(n, width, dtype=torch.float64)
    for i, (prompt, r) in enumerate(zip(prompts, records, strict=True)):
        ids[i, : len(prompt) + len(r["token_ids"])] = torch.tensor([*prompt, *r["token_ids"]])
        mask[i, : len(r["token_ids"])] = 1
        lp[i, : len(r["token_ids"])] = torch.tensor(r["logprobs"], dtype=torch.float64)
    with torch.no_grad():
        logq = torch.log_softmax(model(input_ids=ids).logits.to(torch.float64), dim=-1)
    labels = ids[:, start + 1 : start + 1 + width]
    lq = logq[:, start : start + width].gather(-1, labels[..., None])[..., 0]
    return LossInputs(
        student_logprobs=torch.where(mask.bool(), lq, -1.0), loss_mask=mask, teacher_logprobs=lp
    )


def weighted_shares(inputs: Any, styles: list[str], num_ops: int) -> list[dict[str, Any]]:
    """Per variant and τ (λ = 1): the shortcut's weighted share at the style token and the skill weights."""
    import torch

    from nemo_dcod.losses import build_loss

    shortcut = torch.tensor([s == "shortcut" for s in styles])
    mask = inputs.mask
    stepwise_results = [1 + 6 * i + 4 for i in range(num_ops)]  # response positions of the line results
    rows = []
    for variant in VARIANTS:
        for tau in TAUS:
            loss = build_loss("discord", variant=variant, tau=tau)
            delta, _ = loss.delta(inputs)
            g = torch.sigmoid(delta / tau)
            w = torch.where(mask, g / g[mask].mean(), torch.zeros_like(g))
            w0 = w[:, 0]
            share = float(w0[shortcut].sum() / w0.sum())
            rows.append(
                {
                    "variant": variant,
                    "tau": tau,
                    "weighted_shortcut_share": share,
                    "style_weight_ratio": float(w0[shortcut].mean() / w0[~shortcut].mean()),
                    "stepwise_result_weight": float(w[~shortcut][:, stepwise_results].mean()),
                    "shortcut_result_weight": float(w[shortcut][:, 2 * num_ops + 3].mean()),
                }
            )
    return rows


def measure_seed(run: dict[str, Any], label: str, num_ops: int) -> dict[str, Any]:
    """:func:`weighted_shares` of one seed's student on its seed's filtered traces."""
    import yaml

    train = yaml.safe_load((Path(run["paths"]["train_dir"]) / "config.yaml").read_text())
    prep = json.loads((Path(train["data"]["path"]).parent / "prep.json").read_text())  # the seed's folder
    records = [json.loads(x) for x in Path(prep["traces"]).read_text().splitlines()]
    kept = [r for r in records if _correct(r)]
    inputs = _inputs(Path(run["paths"]["hf_export"]), kept)
    styles = [r["style"] for r in kept]
    return {
        "label": label,
        "traces": len(kept),
        "shortcut_share": sum(s == "shortcut" for s in styles) / len(kept),
        "student_q_shortcut": _first_token_q(run, kept),
        "rows": weighted_shares(inputs, styles, num_ops),
    }


def _first_token_q(run: dict[str, Any], records: list[dict[str, Any]]) -> float:
    """The student's mean probability of ``shortcut`` as the first response word."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_dcod.eval.generation import encode_prompts

    hf = run["paths"]["hf_export"]
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    _, prompts = encode_prompts(tokenizer, [r["question"] for r in records])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(prompts)).logits[:, -1].to(torch.float64)
    probs = torch.softmax(logits, -1)[:, tokenizer.convert_tokens_to_ids("shortcut")]
    return float(probs.mean())


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Why the weights move the skill more than the choice (`{result['label']}` students, "
        f"seeds {result['seeds']})",
        "",
        f"Filtered shortcut share s = {result['shortcut_share']:.3f} (SFT's limit of q(shortcut)); "
        f"the students' mean q(shortcut) = {result['student_q_shortcut']:.3f}; "
        f"teacher p = {result['p_shortcut']}.",
        "",
        "## 1. Token variant, analytic fixed point of q(shortcut) at λ = 1",
        "",
        "| τ | q* | greedy choice |",
        "|---:|---:|---|",
    ]
    for tau, q in result["fixed_points"].items():
        lines.append(f"| {tau} | {q:.3f} | {'shortcut' if q > 0.5 else 'stepwise'} |")
    lines += [
        "",
        "## 2. Measured on the trained students (λ = 1, mean over seeds)",
        "",
        "s_w: the shortcut's weighted share at the style token (the choice flips iff < 0.5); "
        "ratio: mean weight of a shortcut trace's style token / a stepwise trace's; "
        "stepwise results / shortcut result: mean weight on the tokens that carry the skill "
        "(the mean weight over all tokens is 1).",
        "",
        "| variant | τ | s_w | choice | ratio | stepwise results | shortcut result |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        choice = "shortcut" if r["weighted_shortcut_share"] > 0.5 else "stepwise"
        lines.append(
            f"| {r['variant']} | {r['tau']} | {r['weighted_shortcut_share']:.3f} | {choice} | "
            f"{r['style_weight_ratio']:.3f} | {r['stepwise_result_weight']:.3f} | "
            f"{r['shortcut_result_weight']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure the choice channel of a study's students; print and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", required=True, help="a study report's summary.json (the styles task)")
    parser.add_argument("--label", default="sft", help="the student whose log-probs are measured")
    parser.add_argument("--out", default=None, help="folder for choice.md / choice.json")
    args = parser.parse_args(argv)
    summary = json.loads(Path(args.report).read_text())
    task = summary["config"]["task"]
    runs = summary["students"][args.label]["per_seed"]
    seeds = [measure_seed(run, args.label, task["num_ops"]) for run in runs.values()]
    keys = (
        "weighted_shortcut_share",
        "style_weight_ratio",
        "stepwise_result_weight",
        "shortcut_result_weight",
    )
    rows = [
        {**first, **{k: sum(s["rows"][i][k] for s in seeds) / len(seeds) for k in keys}}
        for i, first in enumerate(seeds[0]["rows"])
    ]
    share = sum(s["shortcut_share"] for s in seeds) / len(seeds)
    result = {
        "label": args.label,
        "seeds": list(runs),
        "p_shortcut": task["shortcut_prob"],
        "shortcut_share": share,
        "student_q_shortcut": sum(s["student_q_shortcut"] for s in seeds) / len(seeds),
        "fixed_points": {str(t): fixed_point(share, task["shortcut_prob"], t) for t in TAUS},
        "rows": rows,
        "per_seed": seeds,
        "report": args.report,
    }
    text = _markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "choice.md").write_text(text)
        (out / "choice.json").write_text(json.dumps(result, indent=1) + "\n")
    token1 = next(r for r in rows if r["variant"] == "token" and r["tau"] == 1.0)["weighted_shortcut_share"]
    best = min(rows, key=lambda r: r["weighted_shortcut_share"])
    print(
        f"RESULT sft_share={share:.3f} token_t1_share={token1:.3f} "
        f"lowest_share={best['weighted_shortcut_share']:.3f} lowest={best['variant']}_t{best['tau']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
