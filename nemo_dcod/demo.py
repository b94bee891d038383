"""``nemo-dcod demo``: the embedded default, runnable on a laptop CPU in well under a minute.

What it runs today (the loss core; the full pipeline through NeMo arrives with the later stages):

1. A *stochastic teacher* whose token probabilities are known exactly: a random Markov chain over
   a small vocabulary. It writes traces; their per-token log-probs and top-k are stored with them,
   exactly what ``score`` will store for a real teacher. The first tokens of a trace are the
   prompt (loss mask 0).
2. Students: a bigram logit table whose output dimension is split over ``tensor_model_parallel_size``
   gloo ranks, exactly as Megatron's vocab-parallel output layer is. Every student starts from the
   same initialisation, is warmed up with SFT, then trains with its configured loss through
   :func:`nemo_dcod.parallel.signals.loss_from_logits` (vocab-parallel log-probs, no vocabulary
   gather).
3. Checks and reports: the first tensor-parallel loss equals the unsharded computation; per
   student, the forward KL to the teacher on teacher states, and the teacher's per-token NLL of the
   student's *own* samples (how teacher-like its generations are, the quantity offline
   distillation drifts on). Artifacts: ``config.yaml``, ``<loss>/metrics.jsonl``, ``summary.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist

from nemo_dcod.config import DemoConfig, LossConfig, to_yaml
from nemo_dcod.losses import LossContext, build_loss, reduce_metrics
from nemo_dcod.parallel.launch import run_local
from nemo_dcod.parallel.signals import TraceBatch, loss_from_logits

__all__ = ["run_demo"]

PROMPT_TOKENS = 4


def teacher_logprobs(cfg: DemoConfig) -> torch.Tensor:
    """``[V, V]`` log transition probabilities of the teacher chain (row: previous token)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return torch.log_softmax(
        2.5 * torch.randn(cfg.vocab_size, cfg.vocab_size, generator=gen, dtype=torch.float64), -1
    )


def sample(logp: torch.Tensor, num: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``[num, length + 1]`` token chains sampled from transition log-probs ``logp``."""
    tokens = torch.empty(num, length + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, logp.shape[0], (num,), generator=gen)
    for t in range(length):
        tokens[:, t + 1] = torch.multinomial(logp[tokens[:, t]].float().exp(), 1, generator=gen)[:, 0]
    return tokens


def traces(cfg: DemoConfig) -> tuple[torch.Tensor, TraceBatch]:
    """Input tokens ``[N, S]`` and the traces' batch fields: labels, mask, teacher log-probs, top-k."""
    logp = teacher_logprobs(cfg)
    tokens = sample(logp, cfg.num_traces, cfg.seq_length, torch.Generator().manual_seed(cfg.seed + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    rows = logp[inputs]  # [N, S, V]
    topk = rows.topk(cfg.topk, dim=-1)
    mask = torch.ones(labels.shape, dtype=torch.float64)
    mask[:, :PROMPT_TOKENS] = 0
    return inputs, {
        "labels": labels,
        "loss_mask": mask,
        "teacher_logprobs": rows.gather(-1, labels[..., None])[..., 0],
        "teacher_topk_ids": topk.indices,
        "teacher_topk_logprobs": topk.values,
    }


def _init_table(cfg: DemoConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    return 0.1 * torch.randn(cfg.vocab_size, cfg.vocab_size, generator=gen, dtype=torch.float64)


def _micro_batch(
    data: tuple[torch.Tensor, TraceBatch], cfg: DemoConfig, step: int
) -> tuple[torch.Tensor, TraceBatch]:
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
    rows = torch.randperm(cfg.num_traces, generator=gen)[: cfg.micro_batch_size]
    inputs, batch = data
    fields = cast(dict[str, torch.Tensor], batch)
    return inputs[rows], cast(TraceBatch, {k: v[rows] for k, v in fields.items()})


def train_student(rank: int, world: int, cfg: DemoConfig, loss_cfg: LossConfig) -> dict[str, Any]:
    """One student on ``world`` tensor-parallel ranks; rank 0 returns its history and full table."""
    data = traces(cfg)
    shard = cfg.vocab_size // world
    table = _init_table(cfg)[:, rank * shard : (rank + 1) * shard].clone().requires_grad_()
    opt = torch.optim.Adam([table], lr=cfg.lr)
    sft, loss = build_loss("sft"), loss_cfg.build()
    history = []
    for step in range(cfg.warmup_steps + cfg.steps):
        warm = step < cfg.warmup_steps
        inputs, batch = _micro_batch(data, cfg, step)
        ctx = LossContext(step=step - cfg.warmup_steps, total_steps=cfg.steps, validate=step == 0)
        loss_sum, tokens, metrics = loss_from_logits(
            sft if warm else loss,
            table[inputs],
            batch,
            ctx,
            tp_group=dist.group.WORLD,
            chunk_size=loss_cfg.chunk_size,
        )
        opt.zero_grad()
        (loss_sum / tokens).backward()
        opt.step()
        summary = reduce_metrics([metrics])
        history.append(
            {
                "step": step,
                "phase": "warmup" if warm else loss_cfg.name,
                "loss": float(loss_sum.detach() / tokens),
            }
            | {k: float(v) for k, v in summary.items() if v.numel() == 1 and k != "tokens"}
            | {"weight_hist": summary["weight_hist"].tolist()}
        )
    shards = [torch.empty_like(table) for _ in range(world)]
    dist.all_gather(shards, table.detach())
    return {"history": history, "table": torch.cat(shards, dim=1)} if rank == 0 else {}


def evaluate(cfg: DemoConfig, table: torch.Tensor) -> dict[str, float]:
    """Forward KL to the teacher on teacher-visited states; teacher NLL of the student's samples."""
    logp = teacher_logprobs(cfg)
    logq = torch.log_softmax(table, -1)
    visits = torch.bincount(traces(cfg)[0].reshape(-1), minlength=cfg.vocab_size).double()
    kl_rows = (logp.exp() * (logp - logq)).sum(-1)
    own = sample(logq, 256, cfg.seq_length, torch.Generator().manual_seed(cfg.seed + 3))
    nll = -logp[own[:, :-1], own[:, 1:]].mean()
    entropy_rate = float(-(logp.exp() * logp).sum(-1) @ visits / visits.sum())
    return {
        "kl_teacher_student": float(kl_rows @ visits / visits.sum()),
        "teacher_nll_of_own_samples": float(nll),
        "teacher_entropy_rate": entropy_rate,
    }


def unsharded_first_loss(cfg: DemoConfig) -> float:
    """The first step's loss computed without tensor parallelism, as the exactness check."""
    data = traces(cfg)
    inputs, batch = _micro_batch(data, cfg, 0)
    loss_sum, tokens, _ = loss_from_logits(build_loss("sft"), _init_table(cfg)[inputs], batch, LossContext())
    return float(loss_sum / tokens)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train every configured student, evaluate, write the artifacts, print a table."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    tp = cfg.tensor_model_parallel_size
    reference = unsharded_first_loss(cfg)
    results: dict[str, Any] = {"tensor_model_parallel_size": tp, "students": {}}
    for i, loss_cfg in enumerate(cfg.losses):
        label = f"{i}_{loss_cfg.name}"
        print(f"[demo] training student {label} on TP={tp} ranks ...", flush=True)
        out = run_local(train_student, tp, cfg, loss_cfg)[0]
        first = out["history"][0]["loss"]
        if not math.isclose(first, reference, rel_tol=1e-9):
            raise RuntimeError(f"TP={tp} first loss {first!r} != unsharded {reference!r}: vocab-parallel bug")
        student_dir = run_dir / label
        student_dir.mkdir(exist_ok=True)
        with (student_dir / "metrics.jsonl").open("w") as fh:
            fh.writelines(json.dumps(h) + "\n" for h in out["history"])
        torch.save(out["table"], student_dir / "student.pt")
        results["students"][label] = {
            "loss": asdict(loss_cfg),
            "first_loss_tp": first,
            "final": out["history"][-1],
        } | evaluate(cfg, out["table"])
    results["first_loss_unsharded"] = reference
    (run_dir / "summary.json").write_text(json.dumps(results, indent=2))
    _print_table(results, run_dir)
    return results


def _print_table(results: dict[str, Any], run_dir: Path) -> None:
    print(f"\nfirst-step loss, TP={results['tensor_model_parallel_size']} == unsharded: OK")
    print(f"{'student':<14}{'KL(teacher||student)':>22}{'teacher NLL of own samples':>28}{'ESS':>7}")
    for label, r in results["students"].items():
        ess = r["final"].get("ess", float("nan"))
        print(
            f"{label:<14}{r['kl_teacher_student']:>22.4f}{r['teacher_nll_of_own_samples']:>28.4f}{ess:>7.3f}"
        )
    entropy = next(iter(results["students"].values()))["teacher_entropy_rate"]
    print(f"(teacher entropy rate, the floor of the NLL column: {entropy:.4f})")
    print(f"artifacts: {run_dir}/config.yaml, {run_dir}/summary.json, {run_dir}/<student>/metrics.jsonl")
