"""What a run shows and records: ``metrics.jsonl``, TensorBoard scalars and a progress line with ETA.

The loss and the DisCorD diagnostics exist on the last pipeline stage only (that is where the loss
reduction runs); every step they are sent to the first stage of the same pipeline with one
``broadcast_object_list`` over the pipeline group, so global rank 0 (first stage, data-parallel rank
0, tensor-parallel rank 0) writes them. The loss and diagnostics are already reduced over
data-parallel ranks by :class:`~nemo_dcod.model.reduction.DistillLossReduction`.

One JSON object per optimizer step in ``<run_dir>/metrics.jsonl``, kept whole across resumes
(NeMoLogger moves a run directory's files to ``run_<n>/`` at each launch; the steps up to the
checkpoint are carried back): ``step`` (1-based, the number of
optimizer steps done), ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s`` (sequence tokens processed
per second over all ranks), ``elapsed_s`` and the diagnostics (``ess``, ``clip_fraction``,
``delta_mean``, ``delta_std``, ``weight_mean``, ``g_mean``, ``lambda``, ``weight_hist``); after
each validation, an object with ``step`` and ``val_loss``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from nemo.lightning import io

from nemo_dcod.losses.carry import check_finite_stats

__all__ = [
    "PREEMPT_EXIT_CODE_ENV",
    "CarryWeightStats",
    "MetricsCallback",
    "PreemptOnSigterm",
    "PreemptOnSigusr1",
    "ResumeAsRankZero",
]


def _last_stage_payload(pl_module: Any) -> dict[str, Any] | None:
    reduction = getattr(pl_module, "_training_loss_reduction", None)
    if reduction is None or getattr(reduction, "last_loss", None) is None:
        return None
    payload: dict[str, Any] = {"loss": reduction.last_loss, **reduction.last_metrics}
    hist = getattr(reduction, "last_weight_hist", None)
    if hist is not None:
        payload["weight_hist"] = [int(x) for x in hist.tolist()]
    return payload


def _from_last_stage(payload: dict[str, Any] | None) -> dict[str, Any] | None:
    """The last pipeline stage's payload on every rank of this pipeline (None elsewhere: no PP group)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return payload
    group = parallel_state.get_pipeline_model_parallel_group()
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    box = [payload]
    torch.distributed.broadcast_object_list(box, src=src, group=group)
    return box[0]


class CarryWeightStats(pl.Callback, io.IOMixin):
    """DisCorD's carried statistics (b, ḡ, mean g² of the previous step) on every rank, and in checkpoints.

    The training reduction measures them on the last pipeline stage
    (:class:`~nemo_dcod.model.reduction.CarriedStats`). After each step they are broadcast over
    the pipeline group (five floats), so every rank, global rank 0 included, holds them when
    Lightning's checkpoint callbacks run (those run after every other callback); they are saved
    with the checkpoint's common state and put back on resume, so a resumed run weighs its next
    step exactly as the uninterrupted run did.
    """

    def __init__(self) -> None:
        super().__init__()
        self._restored: dict[str, float] | None = None
        self._module: Any = None

    def _carried(self) -> Any:
        reduction = getattr(self._module, "training_loss_reduction", None) if self._module else None
        return getattr(reduction, "carried", None)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remember the module whose training reduction carries the statistics."""
        del trainer, stage
        self._module = pl_module

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put restored statistics into the run's carrier."""
        del trainer, pl_module
        from nemo_dcod.losses.types import WeightStats

        carried = self._carried()
        if self._restored and carried is not None:
            r = self._restored
            # ready = 0: saved before any statistics were usable (the next step trains with λ = 0).
            stats = WeightStats(r["delta_mean"], r["g_mean"], r.get("g_sq_mean")) if r["ready"] else None
            carried.restore(stats, "restored from the checkpoint the run resumed from")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Send the last stage's statistics to every rank of its pipeline."""
        del trainer, pl_module, outputs, batch, batch_idx
        from megatron.core import parallel_state

        from nemo_dcod.losses.types import WeightStats

        carried = self._carried()
        if carried is None or parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return
        stats = carried.stats
        nan = float("nan")  # g_sq_mean not measured
        box = torch.tensor(
            [
                float(stats is not None),
                float(carried.ready),
                *(stats.delta_mean, stats.g_mean, nan if stats.g_sq_mean is None else stats.g_sq_mean),
            ]
            if stats is not None
            else [0.0, 0.0, 0.0, 0.0, nan],
            dtype=torch.float64,
            device="cuda" if torch.cuda.is_available() else "cpu",
        )
        torch.distributed.broadcast(
            box,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        if float(box[0]) > 0 and bool(box[1]):
            g_sq = float(box[4])
            stats = WeightStats(
                delta_mean=float(box[2]), g_mean=float(box[3]), g_sq_mean=None if math.isnan(g_sq) else g_sq
            )
            # The last stage checked them; this rank's copy is the broadcast one.
            carried.restore(stats, "broadcast from the last pipeline stage")

    def state_dict(self) -> dict[str, Any]:
        """The statistics the next step uses (empty before the first step)."""
        carried = self._carried()
        if carried is None or carried.stats is None:
            return {}
        s = check_finite_stats(carried.stats, "about to be saved in a checkpoint")
        state = {"delta_mean": s.delta_mean, "g_mean": s.g_mean, "ready": float(carried.ready)}
        if s.g_sq_mean is not None:
            state["g_sq_mean"] = s.g_sq_mean
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Statistics from a checkpoint, applied (and checked finite) at train start (``g_sq_mean``:
        absent in older ones)."""
        keys = ("delta_mean", "g_mean", "ready")
        self._restored = {k: float(state_dict[k]) for k in keys} if state_dict else None
        if self._restored is not None and "g_sq_mean" in state_dict:
            self._restored["g_sq_mean"] = float(state_dict["g_sq_mean"])


class MetricsCallback(pl.Callback, io.IOMixin):
    """Writes ``metrics.jsonl`` and TensorBoard scalars on rank 0 and prints progress with ETA.

    An ``IOMixin``: NeMo records it in a checkpoint's context by its arguments, not by pickling.

    Args:
        run_dir: the run directory.
        tokens_per_step: sequence tokens in one global batch (global_batch_size x seq_length).
        max_steps: for the ETA.
        log_every_n_steps: progress-line and TensorBoard interval.
        config_yaml: the resolved config, written to ``<run_dir>/config.yaml`` by rank 0.
    """

    def __init__(
        self,
        run_dir: str | Path,
        tokens_per_step: int,
        max_steps: int,
        log_every_n_steps: int = 1,
        config_yaml: str | None = None,
    ):
        super().__init__()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.config_yaml = config_yaml
        self.tokens_per_step = tokens_per_step
        self.max_steps = max_steps
        self.log_every = max(log_every_n_steps, 1)
        self._start = 0.0
        self._last = 0.0
        self._first_step = 0
        self._resumed_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clocks (after a resume, the ETA counts the remaining steps only)."""
        self._start = self._last = time.perf_counter()
        self._first_step = trainer.global_step
        self._resumed_step = int(trainer.global_step)

    def _start_files(self) -> None:
        # Not in on_train_start: NeMo's ModelCheckpoint.on_train_start (which runs after ours) moves
        # the files of an existing run dir to run_<n>/.
        if self.config_yaml is not None:
            (self.path.parent / "config.yaml").write_text(self.config_yaml)
        self._carry_over_history(self._resumed_step or 0)
        self._resumed_step = None

    def _carry_over_history(self, resumed_step: int) -> None:
        """On a resume, start metrics.jsonl with the steps up to the checkpoint, from the file NeMoLogger
        just moved into ``run_<n>/``: steps a killed launch logged after its last checkpoint are
        dropped (they are trained again), so the file keeps one record per step."""
        if resumed_step == 0 or self.path.exists():
            return
        moved = [p for p in self.path.parent.glob("run_*/metrics.jsonl")]
        if not moved:
            return
        newest = max(moved, key=lambda p: p.stat().st_mtime)  # the folder NeMoLogger just filled
        kept = []
        for line in newest.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a kill
                continue
            if int(record.get("step", 0)) <= resumed_step:
                kept.append(json.dumps(record))
        self.path.write_text("".join(f"{line}\n" for line in kept))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Collect this step's figures on rank 0, append them to metrics.jsonl, log, print."""
        del outputs, batch, batch_idx
        now = time.perf_counter()
        step_time, self._last = now - self._last, now
        payload = _from_last_stage(_last_stage_payload(pl_module))
        if trainer.global_rank != 0:
            return
        if self._resumed_step is not None:
            self._start_files()
        step = int(trainer.global_step)
        record: dict[str, Any] = {"step": step}
        record.update(payload or {})
        record["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None
        grad_norm = trainer.callback_metrics.get("grad_norm")
        record["grad_norm"] = float(grad_norm) if grad_norm is not None else None
        record["tokens_per_s"] = self.tokens_per_step / step_time if step_time > 0 else None
        record["elapsed_s"] = now - self._start
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {f"train/{k}": v for k, v in record.items() if isinstance(v, float) and math.isfinite(v)}
        if trainer.logger is not None and step % self.log_every == 0:
            trainer.logger.log_metrics(scalars, step=step)
        if step % self.log_every == 0 or step == self.max_steps:
            self._print(record, now)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Append ``{"step", "val_loss"}`` (NeMo's logged validation loss) to metrics.jsonl."""
        del pl_module
        value = trainer.callback_metrics.get("val_loss")
        if trainer.global_rank != 0 or value is None or trainer.sanity_checking:
            return
        record = {"step": int(trainer.global_step), "val_loss": float(value)}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"step {record['step']}/{self.max_steps} | val_loss {record['val_loss']:.4f}",
            file=sys.stderr,
            flush=True,
        )

    def _print(self, record: dict[str, Any], now: float) -> None:
        step = record["step"]
        done = step - self._first_step
        remaining = max(self.max_steps - step, 0)
        eta = (now - self._start) / done * remaining if done > 0 else float("nan")
        parts = [f"step {step}/{self.max_steps}"]
        for key, fmt in (("loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".3f"), ("ess", ".3f")):
            if record.get(key) is not None:
                parts.append(f"{key} {record[key]:{fmt}}")
        if record.get("tokens_per_s"):
            parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        if math.isfinite(eta):
            parts.append(f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        print(" | ".join(parts), file=sys.stderr, flush=True)


PREEMPT_EXIT_CODE_ENV = "NEMO_DCOD_PREEMPT_EXIT_CODE"
"""Exit status of a run stopped by a preemption signal once its checkpoint is saved (default 0, as
NeMo's ``PreemptionCallback``). ``launchers/slurm.sh`` sets 75 (EX_TEMPFAIL) to tell a preemption
from the end of training, and requeues the job on it."""


def _preempt_exit_code() -> int:
    value = os.environ.get(PREEMPT_EXIT_CODE_ENV, "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{PREEMPT_EXIT_CODE_ENV}={value!r}: must be an integer exit status.") from None


def _preemption_base() -> type:
    """NeMo's ``PreemptionCallback`` with two changes for cluster launches.

    * SIGUSR1's handler is installed in ``setup`` (the process group exists by then) instead of
      ``on_train_start``: a signal that arrives while the model is built or a checkpoint restored
      is remembered and acted on at the end of the first step, instead of killing the process
      (SIGUSR1's default action). Lightning installs its own SIGUSR1 handler (Slurm auto-requeue)
      after ``setup`` only when none is there; ``nemo_dcod.train.run`` also turns it off.
      SIGTERM keeps NeMo's timing: at fit start Lightning chains its own SIGTERM handler (which
      ends the run without a checkpoint) with whatever is installed, so NeMo's must replace that
      chain at train start.
    * After the checkpoint, every rank waits at a barrier and exits with
      ``$NEMO_DCOD_PREEMPT_EXIT_CODE``: when one rank has exited, every rank's share of the
      checkpoint is on disk, so ``srun --kill-on-bad-exit`` cannot cut a save short.
    """
    from nemo.lightning.pytorch.callbacks import PreemptionCallback

    class Preemption(PreemptionCallback):
        _handler_context: Any  # NeMo's: None, or the entered signal-handler context

        def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
            del trainer, pl_module
            early = self.sig != signal.SIGTERM
            if early and stage == "fit" and self._handler_context is None and self.preemption_supported:
                self._handler_context = self._preemption_handler()
                self._handler_context.__enter__()

        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if self._handler_context is None:
                super().on_train_start(trainer, pl_module)

        def on_train_batch_end(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            try:
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            except SystemExit:  # NeMo's sys.exit(0) after the checkpoint
                torch.distributed.barrier()
                print(
                    f"preempted: checkpoint saved at step {trainer.global_step}; "
                    f"exiting with status {_preempt_exit_code()}",
                    file=sys.stderr,
                    flush=True,
                )
                raise SystemExit(_preempt_exit_code()) from None

    return Preemption


class PreemptOnSigterm(_preemption_base()):  # type: ignore[misc]
    """NeMo's ``PreemptionCallback`` on SIGTERM: checkpoint at the end of the step, then exit
    (status ``$NEMO_DCOD_PREEMPT_EXIT_CODE``, default 0).

    A subclass without arguments because NeMo 2.7.3's context loader takes a recorded object
    with exactly one argument (``sig``) for a pickle-file reference and fails to restore it.
    """

    def __init__(self) -> None:
        super().__init__(sig=signal.SIGTERM)


class PreemptOnSigusr1(_preemption_base()):  # type: ignore[misc]
    """The same on SIGUSR1 (Slurm's ``--signal=USR1@<seconds>`` before the time limit)."""

    def __init__(self) -> None:
        super().__init__(sig=signal.SIGUSR1)


class ResumeAsRankZero(pl.Callback):
    """Every rank resumes from the checkpoint that global rank 0 chose.

    Each rank picks the newest complete checkpoint before NeMo starts
    (:func:`~nemo_dcod.train.checkpoints.newest_complete_checkpoint`; no process group exists
    yet) and gives it to ``AutoResume``. Ranks on different nodes can see a shared file system in
    different states (a writer killed mid-save, client caches): one rank would restore step 4,
    another step 2, and the run would go on with mixed states or hang. In ``setup`` (the process
    group exists, nothing is restored yet) rank 0's choice is broadcast; a rank whose own choice
    differs says so and takes rank 0's: the path Lightning restores from, ``trainer.ckpt_path``,
    the checkpoint callback's ``last_model_path``, and the ``model.init_from`` restore (which
    applies only when nothing is resumed).

    Lightning 2.4's ``Trainer._run`` passes the restore path it was given before the process group
    existed straight to ``_checkpoint_connector._restore_modules_and_callbacks``; a rank that
    switches wraps that method of its trainer's connector (a private method: ranks that agree,
    the usual case, touch nothing). Added after the trainer is built, so it is never recorded in a
    checkpoint's context.

    Args:
        chosen: this rank's own choice (None: no checkpoint to resume).
        restore: the ``model.init_from`` restore (NeMo's ``RestoreConfig``) for a run that resumes
            nothing; None without ``model.init_from``.
    """

    def __init__(self, chosen: Path | None, restore: Any = None) -> None:
        super().__init__()
        self.chosen = chosen
        self.restore = restore

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Broadcast rank 0's choice; switch to it where this rank chose otherwise."""
        del pl_module
        if stage != "fit" or not torch.distributed.is_initialized():
            return
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        box = [str(self.chosen) if self.chosen is not None else None]
        torch.distributed.broadcast_object_list(box, src=0, device=device)
        mine = str(self.chosen) if self.chosen is not None else None
        if box[0] == mine:
            return
        chosen = Path(box[0]) if box[0] is not None else None
        print(
            f"warning: rank {torch.distributed.get_rank()} resumes from "
            f"{chosen or 'no checkpoint'}, the choice of rank 0; its own check chose {mine or 'none'}",
            file=sys.stderr,
            flush=True,
        )
        self._switch(trainer, chosen)

    def _switch(self, trainer: pl.Trainer, chosen: Path | None) -> None:
        from nemo import lightning as nl

        path = (
            nl.AutoResume(resume_from_path=str(chosen), resume_if_exists=False).get_trainer_ckpt_path()
            if chosen is not None
            else None
        )
        trainer.ckpt_path = path
        trainer.strategy.restore_config = None if chosen is not None else self.restore  # type: ignore[attr-defined]
        if trainer.checkpoint_callback is not None:
            trainer.checkpoint_callback.last_model_path = str(path) if path else ""  # type: ignore[attr-defined]
        connector = trainer._checkpoint_connector
        restore = connector._restore_modules_and_callbacks

        def restore_rank_zeros_choice(checkpoint_path: Any = None) -> None:
            del checkpoint_path  # this rank's own choice, bound before the process group existed
            connector._restore_modules_and_callbacks = restore  # type: ignore[method-assign]  # once
            restore(path)

        connector._restore_modules_and_callbacks = restore_rank_zeros_choice  # type: ignore[method-assign]
