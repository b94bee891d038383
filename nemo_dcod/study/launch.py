"""One training of a study, through ``nemo-dcod train`` in its own process tree.

Every training of a study (a seed's initial or warm-up checkpoint, every student) is the real
``train`` stage on a store: a :class:`~nemo_dcod.train.config.TrainConfig` saved as YAML beside
the run, then ``nemo-dcod train --config`` in a subprocess (under torchrun when TP > 1: torchrun
starts every rank at once, where Lightning would start rank 1 only after rank 0 imported NeMo).
Lightning and Megatron keep global state, so a training never runs inside the study's process.
One thread per rank: the jobs of a study share the machine's cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from nemo_dcod.config import to_yaml
from nemo_dcod.study.config import StudyError

__all__ = ["check", "train_config", "train_run"]


def check(stage_cfg: Any, stage: str) -> None:
    """Raise a stage config's problems (as the CLI would) before running it."""
    from nemo_dcod.config import ConfigError

    problems = stage_cfg.problems()
    if problems:
        raise ConfigError(problems, f"study's {stage} config")


def train_config(
    run_dir: Path,
    store: Path,
    *,
    seed: int,
    vocab_size: int,
    seq_length: int,
    steps: int,
    global_batch_size: int,
    lr: float,
    tp: int,
    loss: dict[str, Any],
    init_from: Path | None = None,
    hidden_size: int | None = None,
    ffn_hidden_size: int | None = None,
    shuffle: bool = True,
) -> Any:
    """A :class:`TrainConfig` of the tiny Llama 3.1 on ``store`` (one micro-batch per step, no validation).

    With ``init_from`` the architecture is the checkpoint's (widths must then be None). ``shuffle``:
    ``data.shuffle`` (False: the store's order every epoch, as every run before 2026-12-07).
    """
    from nemo_dcod.parallel.layout import ParallelSection
    from nemo_dcod.train.config import DataSection, ModelSection, OptimSection, TrainConfig, TrainerSection

    return TrainConfig(
        run_dir=str(run_dir),
        seed=1234 + seed,  # NeMo's Megatron seeding rejects 0
        resume=False,
        model=ModelSection(
            family="llama3.1",
            size="tiny",
            spec="local",
            init_from=str(init_from) if init_from is not None else None,
            hidden_size=hidden_size,
            ffn_hidden_size=ffn_hidden_size,
        ),
        parallel=ParallelSection(tensor_model_parallel_size=tp),
        optim=OptimSection(
            lr=lr, min_lr=lr / 10, warmup_steps=min(10, steps // 10), weight_decay=0.0, clip_grad=1.0
        ),
        data=DataSection(
            source="store",
            path=str(store),
            vocab_size=vocab_size,
            seq_length=seq_length,
            num_val_samples=0,
            shuffle=shuffle,
        ),
        trainer=TrainerSection(
            max_steps=steps,
            global_batch_size=global_batch_size,
            micro_batch_size=global_batch_size,
            devices=tp,
            log_every_n_steps=max(steps // 5, 1),
            ckpt_every_n_steps=steps,
            save_top_k=1,
        ),
        loss=dict(loss),
    )


def train_run(cfg: Any, logs: Path, name: str) -> Path:
    """Run ``nemo-dcod train`` on ``cfg`` (saved as ``logs/<name>.yaml``, output in ``logs/<name>.log``).

    Returns:
        the run's final checkpoint.

    Raises:
        StudyError: the training failed or left no complete checkpoint (naming its log).
    """
    from nemo_dcod.train.checkpoints import newest_complete_checkpoint

    check(cfg, f"train ({name})")
    logs.mkdir(parents=True, exist_ok=True)
    config_path = logs / f"{name}.yaml"
    config_path.write_text(f"# nemo-dcod train --config {config_path}\n" + to_yaml(cfg))
    log_path = logs / f"{name}.log"
    ranks = cfg.trainer.devices
    cmd = [sys.executable]
    if ranks > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd += ["-m", "nemo_dcod.cli", "train", "--config", str(config_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    with log_path.open("w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise StudyError(f"train {name} failed (exit {code}); last lines of {log_path}:\n{tail}")
    checkpoint = newest_complete_checkpoint(Path(cfg.run_dir) / "checkpoints")
    if checkpoint is None:
        raise StudyError(f"train {name}: no complete checkpoint in {cfg.run_dir}/checkpoints; see {log_path}")
    return checkpoint
