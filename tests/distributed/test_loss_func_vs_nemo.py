"""The plain ``loss_func`` under bare megatron-core schedules gives NeMo's loss and gradient norm.

The NeMo path is ``nemo-dcod train`` itself, run as a user runs it (a subprocess, TP=1, one process,
fp32, local layer spec): the tiny Llama 3.1 student on the synthetic trace source with DisCorD
(token variant, λ = 1 from the first step, so its weights matter). A first run trains one step with
a large learning rate and saves a NeMo 2 checkpoint; a second run starts from it
(``model.init_from``, a different ``seed`` so that an ignored checkpoint would show) and takes one
step. Its ``metrics.jsonl`` gives the step-1 ``loss``, ``grad_norm`` (``optim.clip_grad=0``: the
raw norm, which Megatron's chained optimizer computes even without clipping) and the DisCorD
diagnostics, all at the checkpoint's weights.

The bare path, in gloo processes at TP=1, TP=2, DP=2 and TP=2 x DP=2: the megatron-core model of the
same ``GPTConfig`` (``build_model`` of the same ``TrainConfig``, then ``configure_model``), the
checkpoint's weights loaded with ``dist_checkpointing.load`` into ``sharded_state_dict(prefix=
"module.")`` (NeMo saves the model under ``MegatronParallel``'s ``module.`` prefix; the local spec's
norms under Transformer Engine's names, e.g. ``linear_qkv.layer_norm_weight``, which the model's own
sharded state dict maps back), the same global batch, ``get_forward_backward_func()`` with
:func:`~nemo_dcod.model.megatron_loss.make_loss_func` (step 0 of ``max_steps``), DDP and
``finalize_model_grads``.

The batch: samples ``0 .. global_batch_size - 1`` of ``SyntheticTraces`` in index order. NeMo's
``MegatronPretrainingSampler`` cuts them into global micro-batches of ``micro_batch_size x DP``
consecutive samples and gives data-parallel rank ``r`` the ``r``-th slice of ``micro_batch_size``;
the bare path does the same with its own micro-batch size, so that the global micro-batches (over
which DisCorD's weight statistics are reduced) are the same samples at every layout.

Checked against NeMo, at rel. 1e-5: the loss (sum over loss tokens / their global count), the global
gradient norm (over ``main_grad`` after ``finalize_model_grads``, each tensor-parallel duplicate
counted once, as Megatron's optimizer counts it), and the diagnostics (λ, mean weight, ESS, mean Δ,
mean g, clip fraction).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from helpers.dist_utils import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Written out so that the test does not depend on the schema's defaults; the bare path builds its
# TrainConfig from the same strings.
OVERRIDES = [
    "model.family=llama3.1",
    "model.size=tiny",
    "model.spec=local",
    "data.vocab_size=1000",
    "data.seq_length=64",
    "data.topk=4",
    "data.seed=0",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=1",
    "trainer.ckpt_every_n_steps=1",
    "optim.clip_grad=0",
    "loss.name=discord",
    "loss.variant=token",
    "loss.base=ce",
    "loss.lambda_max=1.0",
    # The plain loss_func reduces DisCorD's statistics per micro-batch: compare like with like (the
    # plug-in's default carries the previous step's, and its first step has λ = 0).
    "loss.stats=micro_batch",
    "resume=false",
]
INIT_RUN = ["seed=1234", "optim.lr=0.01"]  # one large step: the checkpoint is far from any random init
LOADED_RUN = ["seed=4321"]
LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(2, 2)]}  # world size -> (TP, DP)
RTOL = 1e-5
DIAGNOSTICS = ("lambda", "weight_mean", "ess", "delta_mean", "g_mean", "clip_fraction")


def _nemo_dcod() -> str:
    exe = shutil.which("nemo-dcod", path=str(Path(sys.executable).parent)) or shutil.which("nemo-dcod")
    if exe is None:
        raise AssertionError("the nemo-dcod entry point is not installed next to this Python")
    return exe


def _train(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Run ``nemo-dcod train`` (TP=1, one process); return the step-1 record of its metrics.jsonl."""
    cmd = [_nemo_dcod(), "train", f"run_dir={run_dir}", *OVERRIDES, *overrides]
    proc = subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True, timeout=300)
    output = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{output}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1], f"{run_dir}: steps {[r['step'] for r in records]}"
    return dict(records[0])


def _train_config(tp: int) -> Any:
    from nemo_dcod.config import load_config
    from nemo_dcod.train.config import TrainConfig

    cfg = load_config(TrainConfig, None, [*OVERRIDES, *LOADED_RUN])
    cfg.parallel.tensor_model_parallel_size = tp  # this process's layout; the schema checks devices
    return cfg


def _global_batch(cfg: Any) -> list[dict[str, torch.Tensor]]:
    """Samples 0 .. global_batch_size - 1, one ``[1, S]`` dict each, as the NeMo run reads them."""
    from nemo_dcod.data.synthetic import SyntheticTraces

    d, t = cfg.data, cfg.trainer
    traces = SyntheticTraces(d.vocab_size, d.seq_length, t.global_batch_size, topk=d.topk, seed=d.seed)
    return [{k: v[None] for k, v in traces[i].items()} for i in range(t.global_batch_size)]


def _micro_batches(samples: list[dict[str, torch.Tensor]], rows: int, dp: int, dp_rank: int) -> list[Any]:
    """This DP rank's micro-batches of ``rows`` samples, split like ``MegatronPretrainingSampler``."""
    per_step = rows * dp
    out = []
    for start in range(0, len(samples), per_step):
        mine = samples[start + dp_rank * rows : start + (dp_rank + 1) * rows]
        out.append({k: torch.cat([s[k] for s in mine]) for k in mine[0]})
    return out


def _load_weights(model: Any, ckpt: Path) -> int:
    """Fill ``model`` from the NeMo checkpoint's distributed weights; returns the tensors loaded."""
    from megatron.core import dist_checkpointing

    sharded = model.sharded_state_dict(prefix="module.")
    loaded = dist_checkpointing.load(sharded, str(ckpt / "weights"))  # plus NeMo's common state
    state = {k.removeprefix("module."): loaded[k] for k in sharded}
    model.load_state_dict(state, strict=True)
    return sum(isinstance(v, torch.Tensor) for v in state.values())


def _step(tp: int, dp: int, ckpt: Path) -> dict[str, Any]:
    """One forward-backward of the global batch at this layout: loss, grad norm, diagnostics."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from nemo_dcod.losses.registry import build_from_section
    from nemo_dcod.model.megatron_loss import make_loss_func
    from nemo_dcod.train.config import padded_vocab_size
    from nemo_dcod.train.run import build_model

    parallel_state.initialize_model_parallel(tp, 1, create_gloo_process_groups=False)
    try:
        cfg = _train_config(tp)
        model_parallel_cuda_manual_seed(cfg.seed)  # the TP rng tracker that attention dropout forks
        gpt_config = build_model(cfg).config
        assert gpt_config.vocab_size == padded_vocab_size(cfg.data.vocab_size, tp)
        model = gpt_config.configure_model(tokenizer=None)
        loaded = _load_weights(model, ckpt)
        gpt_config.finalize_model_grads_func = finalize_model_grads
        ddp = DistributedDataParallel(
            gpt_config,
            DistributedDataParallelConfig(grad_reduce_in_fp32=True, average_in_collective=False),
            model,
        )
        ddp.zero_grad_buffer()
        assert parallel_state.get_data_parallel_world_size() == dp
        rows = cfg.trainer.micro_batch_size // dp  # NeMo's micro-batch (DP=1), split over DP ranks
        micro = _micro_batches(_global_batch(cfg), rows, dp, parallel_state.get_data_parallel_rank())
        loss = build_from_section(cfg.loss)

        def forward_step(data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
            mb = next(data_iterator)
            logits = model(mb["tokens"], mb["position_ids"], None)  # no labels: [B, S, V/TP]
            return logits, make_loss_func(
                loss,
                mb,
                step=0,
                total_steps=cfg.trainer.max_steps,
                vocab_size=cfg.data.vocab_size,
                chunk_size=cfg.loss.get("chunk_size"),
                validate=cfg.loss.get("validate", True),
            )

        logged = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro),
            model=[ddp],
            num_microbatches=len(micro),
            seq_length=cfg.data.seq_length,
            micro_batch_size=rows,
            forward_only=False,
        )
        # Logged values: [sum, tokens] pairs summed over micro-batches and DP; scalars averaged.
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        sums = {k: torch.stack([x[k] for x in logged]).sum(0) for k in logged[0] if logged[0][k].numel() == 2}
        for value in sums.values():
            dist.all_reduce(value, group=dp_group)
        scalars = {k: float(torch.cat([x[k] for x in logged]).mean()) for k in logged[0] if k not in sums}
        mean = {k: float(v[0] / v[1]) for k, v in sums.items()}
        # Megatron's optimizer norm: every main_grad once per model-parallel group (a TP-duplicated
        # norm weight counted on TP rank 0 only); DP ranks already hold the same reduced gradient.
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        square = torch.zeros((), dtype=torch.float64)
        for p in ddp.module.parameters():
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                square += p.main_grad.double().square().sum()
        dist.all_reduce(square, group=parallel_state.get_model_parallel_group())
        return {
            "loaded_tensors": loaded,
            "logits_vocab": model.output_layer.weight.shape[0],
            "loss": mean["lm loss"],
            "grad_norm": math.sqrt(float(square)),
            "lambda": scalars["dcod lambda"],
            "weight_mean": mean["dcod weight_mean"],
            "ess": mean["dcod weight_mean"] ** 2 / mean["dcod weight_sq_mean"],
            "delta_mean": mean["dcod delta_mean"],
            "g_mean": mean["dcod g_mean"],
            "clip_fraction": mean["dcod clipped_fraction"],
        }
    finally:
        parallel_state.destroy_model_parallel()


def _worker(rank: int, world: int, ckpt: Path) -> dict[tuple[int, int], dict[str, Any]]:
    return {(tp, dp): _step(tp, dp, ckpt) for tp, dp in LAYOUTS[world]}


def test_megatron_loss_func_matches_nemo_train(tmp_path: Path) -> None:
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode
    from nemo_dcod.train.checkpoints import newest_complete_checkpoint

    init = _train(tmp_path / "init", INIT_RUN)
    ckpt = newest_complete_checkpoint(tmp_path / "init" / "checkpoints")
    assert ckpt is not None, f"no complete checkpoint in {tmp_path / 'init' / 'checkpoints'}"
    nemo = _train(tmp_path / "loaded", [*LOADED_RUN, f"model.init_from={ckpt}"])
    assert abs(nemo["loss"] / init["loss"] - 1) > 1e-2, (
        f"loss {nemo['loss']} from the checkpoint is that of a random init ({init['loss']}): "
        "model.init_from did not load the trained weights"
    )
    for key in ("loss", "grad_norm", *DIAGNOSTICS):
        assert nemo.get(key) is not None and math.isfinite(nemo[key]), f"NeMo logged {key}={nemo.get(key)}"
    assert nemo["lambda"] == 1.0 and 0 < nemo["ess"] < 0.9, "DisCorD's weights must matter here"

    enable_cpu_mode()  # once here (imports NeMo): the forked ranks inherit it
    worst: dict[str, float] = {}
    for world in LAYOUTS:
        for rank, per_layout in enumerate(run_distributed(_worker, world, ckpt)):
            for (tp, dp), got in per_layout.items():
                where = f"TP={tp} DP={dp} rank {rank}"
                assert got["logits_vocab"] == 1024 // tp, f"{where}: output layer {got['logits_vocab']}"
                assert got["loaded_tensors"] >= 10, f"{where}: {got['loaded_tensors']} tensors loaded"
                for key in ("loss", "grad_norm", *DIAGNOSTICS):
                    rel = abs(got[key] - nemo[key]) / max(abs(nemo[key]), 1e-12)
                    worst[key] = max(worst.get(key, 0.0), rel)
                    assert rel <= RTOL, f"{where}: {key} {got[key]!r} vs NeMo {nemo[key]!r} (rel. {rel:.1e})"
    print("worst rel. difference to NeMo:", {k: f"{v:.1e}" for k, v in worst.items()})
