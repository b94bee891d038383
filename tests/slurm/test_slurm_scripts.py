"""The sbatch scripts on a real two-node (four-node) Slurm cluster started on this machine.

* ``sbatch --wait slurm/distill_tiny_local.sh``: prepare -> score (skipped while the CLI lacks it)
  -> train at TP=2 across node1 and node2 (one gloo rank per node, launched by
  ``launchers/slurm.sh`` through srun) -> export -> eval, in one job.
* The generate stage: the tiny script's two nodes are two independent workers, and prepare reads
  their traces; the 70B driver dry-runs generate and lays its job out one task per node.
* Preemption: the training job gets the configured signal mid-training (``scancel --batch
  --signal=USR1``: what ``#SBATCH --signal=B:USR1@<s>`` sends); it checkpoints, requeues itself,
  resumes, and its final checkpoint equals the uninterrupted run's bit for bit (model and Adam
  moments, read with ``torch.distributed.checkpoint``).
* ``slurm/distill_70b_to_8b.sh``: ``sbatch --test-only`` accepts the driver and every stage's
  H100 layout (2 x 8 GPUs to score, 4 x 8 to train, 1 GPU to export, 1 to eval) on the cluster's
  four fake 8-GPU nodes, and rejects one it cannot hold; then, with its sizes set to the tiny
  config, its four chained jobs run end to end and train the same weights as the tiny script.

The checks that need no cluster (``bash -n`` and shellcheck of the scripts, Lightning's Slurm
environment under srun) are unit tests: ``tests/unit/test_slurm_scripts_static.py``.

Every run trains 6 steps with a checkpoint every 2 (~35 s of a ~100 s pipeline on 2 cores).

    .venv/bin/pytest tests/slurm -q -s      # ~5 min on 2 cores (root; installs Slurm if missing)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers.paths import ROOT
from helpers.slurm_cluster import LocalSlurm
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from nemo_dcod.train.checkpoints import newest_complete_checkpoint

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

NEMO_DCOD = str(Path(sys.executable).with_name("nemo-dcod"))
STEPS = 6
TRAIN_OVERRIDES = "trainer.ckpt_every_n_steps=2 trainer.val_check_interval=0"
JOB_TIMEOUT_S = 420.0


def _tiny_env(run_root: Path, **extra: str) -> dict[str, str]:
    return {
        "DCOD_ROOT": str(ROOT),
        "RUN_ROOT": str(run_root),
        "NEMO_DCOD": NEMO_DCOD,
        "TRAIN_STEPS": str(STEPS),
        "TRAIN_OVERRIDES": TRAIN_OVERRIDES,
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``<checkpoint>/weights`` (model and optimizer), TP shards assembled."""
    reader = dcp.FileSystemReader(checkpoint / "weights")
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in reader.read_metadata().state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def _final_checkpoint(run_dir: Path) -> Path:
    final = newest_complete_checkpoint(run_dir / "checkpoints")
    assert final is not None, sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert f"step={STEPS - 1}-" in final.name, final
    return final


def _assert_same_weights(run_dir: Path, reference_dir: Path) -> None:
    got, expected = _weights(_final_checkpoint(run_dir)), _weights(_final_checkpoint(reference_dir))
    assert sorted(got) == sorted(expected)
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in got)  # Adam's moments too
    differ = {
        k: float((got[k] - expected[k]).abs().max()) for k in expected if not torch.equal(got[k], expected[k])
    }
    assert not differ, f"tensors that differ from the uninterrupted run (max |diff|): {differ}"


def _train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if '"loss"' in line]


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"<{path} missing>"


# --------------------------------------------------------------------------- the tiny pipeline


@pytest.fixture(scope="module")
def teacher_nemo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the tiny traces' tokenizer, imported to NeMo 2 as a user would."""
    from helpers.hf_tiny import make_hf_checkpoint
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("teacher")
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "examples" / "tiny" / "tokenizer")
    hf = make_hf_checkpoint(root / "hf", "llama", seed=7, vocab_size=len(tokenizer))
    tokenizer.save_pretrained(hf)  # replaces the generic test tokenizer
    proc = subprocess.run(
        [NEMO_DCOD, "import", "--hf", str(hf), "--out", str(root / "nemo")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "nemo"


@pytest.fixture(scope="module")
def tiny_run(
    slurm_cluster: LocalSlurm, teacher_nemo: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, int]:
    """``sbatch --wait slurm/distill_tiny_local.sh`` with a teacher: (run root, job id); it must succeed."""
    run_root = tmp_path_factory.mktemp("tiny")
    start = time.monotonic()
    proc = slurm_cluster.run(
        ["sbatch", "--wait", f"--output={run_root}/job-%j.out", "slurm/distill_tiny_local.sh"],
        check=False,
        env=_tiny_env(run_root, TEACHER_NEMO=str(teacher_nemo)),
        timeout=JOB_TIMEOUT_S,
    )
    job_id = int(re.search(r"Submitted batch job (\d+)", proc.stdout).group(1))  # type: ignore[union-attr]
    output = _read(run_root / f"job-{job_id}.out")
    assert proc.returncode == 0, f"{proc.stderr}\n{output}\n{_read(run_root / 'logs' / 'train.log')[-4000:]}"
    print(f"tiny pipeline: {time.monotonic() - start:.0f} s", file=sys.stderr)
    return run_root, job_id


def test_tiny_pipeline_runs_across_two_nodes(slurm_cluster: LocalSlurm, tiny_run: tuple[Path, int]) -> None:
    run_root, job_id = tiny_run
    job = slurm_cluster.job(job_id)
    assert (job["JobState"], job["ExitCode"], job["NumNodes"]) == ("COMPLETED", "0:0", "2"), job
    assert job["NodeList"] == "node[1-2]", job
    output = _read(run_root / f"job-{job_id}.out")
    for stage in ("prepare", "score", "train", "export", "eval"):
        assert f"stage {stage} (job {job_id}, restart 0)" in output, output
    # The training step: one rank per node, MASTER_ADDR the first node, Lightning's devices/nodes.
    assert "2 node(s) x 1 task(s), MASTER_ADDR=node1" in output, output
    assert "trainer.devices=1 trainer.num_nodes=2" in output, output
    train_log = _read(run_root / "logs" / "train.log")
    assert "All tensor model parallel group ranks: [[0, 1]]" in train_log  # TP=2 spans both nodes
    assert re.search(r"^1: ", train_log, re.MULTILINE), train_log[-3000:]  # rank 1 ran (on node2)
    assert _train_steps(run_root / "train") == list(range(1, STEPS + 1))
    # The teacher scored the store, data-parallel: one replica per node, each its own shards.
    manifest = json.loads((run_root / "store" / "manifest.json").read_text())
    assert manifest["teacher"]["logprobs"] == "teacher" and manifest["teacher"]["topk"] == 4, manifest
    assert manifest["columns"]["teacher_topk_ids"] is not None, manifest["columns"]
    score_log = _read(run_root / "logs" / "score.log")
    assert "tokens scored (teacher" in score_log, score_log
    # Stages the installed nemo-dcod lacks are logged as skipped; those it has left their outputs.
    if "skipped: '" + NEMO_DCOD + " export" not in output:
        assert (run_root / "export" / "hf" / "config.json").is_file(), _read(run_root / "logs" / "export.log")
    if "skipped: '" + NEMO_DCOD + " eval" not in output:
        assert (run_root / "eval" / "results.json").is_file(), _read(run_root / "logs" / "eval.log")[-3000:]


def test_preempted_training_requeues_resumes_and_matches(
    slurm_cluster: LocalSlurm, tiny_run: tuple[Path, int], tmp_path: Path
) -> None:
    """The configured signal mid-training: checkpoint, exit, requeue, resume, the same weights."""
    reference = tiny_run[0] / "train"
    run_root = tmp_path / "preempted"
    env = _tiny_env(run_root, STAGES="train", STORE=str(tiny_run[0] / "store"))
    proc = slurm_cluster.run(
        ["sbatch", "--parsable", f"--output={tmp_path}/job-%j.out", "slurm/distill_tiny_local.sh"], env=env
    )
    job_id = int(proc.stdout.strip().split(";")[0])
    output_path = tmp_path / f"job-{job_id}.out"
    # Signalled as soon as step 1 is done (6 steps take ~5 s once training runs): the ranks stop at
    # the end of a later step, save, and the requeued job resumes from that save.
    metrics = run_root / "train" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().strip()):
        info = slurm_cluster.job(job_id)
        assert info["JobState"] in ("PENDING", "RUNNING"), (info, _read(output_path))
        assert time.monotonic() < deadline, "training did not start in time"
        time.sleep(0.05)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job_id)])

    info = slurm_cluster.wait_job(job_id, timeout=JOB_TIMEOUT_S)
    output = _read(output_path)
    train_log = _read(run_root / "logs" / "train.log")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (info, output)
    assert "SIGUSR1 (preemption): forwarded to rank 0" in output, output
    assert f"job {job_id} requeued" in output, output
    assert f"stage train (job {job_id}, restart 1)" in output, output
    stopped = re.search(
        r"^0: preempted: checkpoint saved at step (\d+); exiting with status 75", train_log, re.M
    )
    assert stopped, train_log[-4000:]
    stopped_at = int(stopped.group(1))
    assert 1 <= stopped_at < STEPS, stopped_at
    resumed = re.search(r"Restored all states from the checkpoint at (\S+)/weights", train_log)
    assert resumed, train_log[-4000:]
    assert Path(resumed.group(1)).name == f"step={stopped_at - 1}-consumed_samples={stopped_at * 4}.0-last"
    assert _train_steps(run_root / "train") == list(range(1, STEPS + 1))  # each step once
    relaunch = train_log[train_log.index(resumed.group(0)) :]
    trained_again = [int(m) for m in re.findall(r"^0: step (\d+)/\d+ \| loss", relaunch, re.M)]
    assert trained_again and min(trained_again) > stopped_at, trained_again
    _assert_same_weights(run_root / "train", reference)


# --------------------------------------------------------------------------- the 70B -> 8B recipe


def test_70b_recipe_layout_passes_sbatch_test_only(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    from helpers.trace_fixtures import make_tokenizer

    driver = slurm_cluster.run(["sbatch", "--test-only", "slurm/distill_70b_to_8b.sh"], check=False)
    assert driver.returncode == 0, driver.stderr
    # The 8B student's store, as prepare will make it: 8k-token rows, Llama 3's vocabulary size.
    tokenizer = make_tokenizer(tmp_path / "tok", vocab_size=128256)
    env = {
        "DCOD_TEST_ONLY": "1",
        "PREPARE_CONFIG": "conf/prepare_tiny.yaml",
        "PREPARE_OVERRIDES": f"seq_length=8192 tokenizer={tokenizer}",
        "STORE": str(tmp_path / "store"),
        "LOG_DIR": str(tmp_path / "logs"),
        "EVAL_CONFIG": "conf/eval_tiny.yaml",
    }
    # With nemo-dcod installed the driver first dry-runs prepare, score and train, the store not
    # there yet: every check of each job at start, against the store plan; layout and memory per GPU.
    full = slurm_cluster.run(
        ["bash", "slurm/distill_70b_to_8b.sh"], check=False, env={**env, "NEMO_DCOD": NEMO_DCOD}
    )
    assert full.returncode == 0, full.stdout + full.stderr
    assert re.search(r"^train: llama3.1 8b, 32 ranks = TP 2 x PP 1 x CP 1 x DP 16", full.stdout, re.M), (
        full.stdout
    )
    assert re.search(
        r"^memory estimate per GPU \(training.*: [\d.]+ GiB .* fits in 72 GiB", full.stdout, re.M
    )
    assert "prepare: store plan written" in full.stdout and "packed rows as THD" in full.stdout, full.stdout
    # A store the recipe cannot train on (4k-token rows) is refused before submission.
    short = {**env, "NEMO_DCOD": NEMO_DCOD, "PREPARE_OVERRIDES": f"seq_length=4096 tokenizer={tokenizer}"}
    proc = slurm_cluster.run(["bash", "slurm/distill_70b_to_8b.sh"], check=False, env=short)
    assert "rows of 4096 tokens" in proc.stderr and "not runnable as configured" in proc.stderr, proc.stderr
    lines = dict(re.findall(r"^(score|train|export|eval): (ok .*)$", full.stdout, re.M))
    assert sorted(lines) == ["eval", "export", "score", "train"], full.stdout
    gpus = "--ntasks-per-node=8 --gpus-per-node=8 --exclusive"
    assert "--nodes=2 " in lines["score"] and gpus in lines["score"], lines
    assert "--nodes=4 " in lines["train"] and gpus in lines["train"], lines
    assert "--gpus-per-node=1" in lines["export"] and "--gpus-per-node=1" in lines["eval"], lines
    assert full.stderr.count("to start at") == 4, full.stderr
    # The check can fail: five training nodes do not exist here, nine GPUs per node neither.
    for too_big in ({"TRAIN_NODES": "5"}, {"GPUS_PER_NODE": "9", "SCORE_TP": "9"}):
        proc = slurm_cluster.run(["bash", "slurm/distill_70b_to_8b.sh"], check=False, env={**env, **too_big})
        assert proc.returncode != 0 and "cannot run this layout" in proc.stderr, (too_big, proc.stderr)
    # A layout whose estimate exceeds the GPUs' memory is refused before anything is submitted.
    unsharded = {
        "NEMO_DCOD": NEMO_DCOD,
        "TRAIN_TP": "1",
        "TRAIN_OVERRIDES": "parallel.sequence_parallel=false",
    }
    proc = slurm_cluster.run(["bash", "slurm/distill_70b_to_8b.sh"], check=False, env={**env, **unsharded})
    assert "DOES NOT FIT" in proc.stdout and "not runnable as configured" in proc.stderr, (
        proc.stdout + proc.stderr
    )


def test_generate_stage_two_workers_then_prepare(
    slurm_cluster: LocalSlurm, teacher_nemo: Path, tmp_path: Path
) -> None:
    """The tiny script's generate stage: the two nodes are two workers (their own shards), then
    prepare reads the traces with the prepare.yaml generate wrote."""
    run_root = tmp_path / "gen"
    env = _tiny_env(
        run_root,
        STAGES="generate prepare",
        GENERATE_TEACHER=str(teacher_nemo.parent / "hf"),  # its context is 64 tokens
        GENERATE_OVERRIDES="sampling.max_new_tokens=40",
    )
    proc = slurm_cluster.run(
        ["sbatch", "--wait", f"--output={run_root}-%j.out", "slurm/distill_tiny_local.sh"],
        check=False,
        env=env,
        timeout=JOB_TIMEOUT_S,
    )
    log = _read(run_root / "logs" / "generate.log")
    assert proc.returncode == 0, proc.stderr + log[-3000:] + _read(run_root / "logs" / "prepare.log")[-2000:]
    for worker in (0, 1):  # srun's SLURM_PROCID / SLURM_NTASKS, one worker per node
        assert re.search(rf"^{worker}: generate: worker {worker} of 2 \(srun\): 1 shard\(s\)", log, re.M), log
    report = json.loads((run_root / "generate" / "report.json").read_text())
    assert report["ok"] and report["samples"] == 32 and report["shards"] == 2, report
    manifest = json.loads((run_root / "store" / "manifest.json").read_text())
    prepared = json.loads((run_root / "store" / "report.json").read_text())
    assert manifest["columns"]["teacher_logprobs"] is not None, manifest["columns"]
    assert prepared["records_read"] == 32 and "teacher_tokens_mismatch" not in prepared["skipped"], prepared


def test_70b_recipe_generate_stage_preflight_and_layout(
    slurm_cluster: LocalSlurm, teacher_nemo: Path, tmp_path: Path
) -> None:
    """With generate in STAGES the driver dry-runs it (problems, prompts, lengths; no model) and
    lays out its job: one task per node, the node's GPUs."""
    env = {
        "DCOD_TEST_ONLY": "1",
        "STAGES": "generate",
        "NEMO_DCOD": NEMO_DCOD,
        "LOG_DIR": str(tmp_path / "logs"),
        "GENERATE_CONFIG": "conf/generate_tiny.yaml",
        "GENERATE_TEACHER": str(teacher_nemo.parent / "hf"),
        "GENERATE_OVERRIDES": "sampling.max_new_tokens=40",
    }
    proc = slurm_cluster.run(["bash", "slurm/distill_70b_to_8b.sh"], check=False, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "generate: dry run ok" in proc.stdout, proc.stdout
    line = re.search(r"^generate: ok (.*)$", proc.stdout, re.M)
    assert line and "--nodes=2 " in line.group(1), proc.stdout
    assert "--ntasks-per-node=1 --gpus-per-node=8 --exclusive" in line.group(1), line.group(1)
    # The check can fail: a trace that cannot fit the teacher's context is refused before submission.
    too_long = {**env, "GENERATE_OVERRIDES": "sampling.max_new_tokens=60"}
    proc = slurm_cluster.run(["bash", "slurm/distill_70b_to_8b.sh"], check=False, env=too_long)
    assert "exceed the context of 64 tokens" in proc.stderr, proc.stderr
    assert "the generate stage is not runnable as configured" in proc.stderr, proc.stderr


def test_70b_recipe_runs_end_to_end_with_tiny_sizes(
    slurm_cluster: LocalSlurm, tiny_run: tuple[Path, int], teacher_nemo: Path, tmp_path: Path
) -> None:
    """The four chained jobs of the H100 recipe, sized down to the tiny config on CPU nodes."""
    run_root = tmp_path / "recipe"
    env = _tiny_env(
        run_root,
        GPUS_PER_NODE="0",
        CPU_TASKS_PER_NODE="1",
        CPUS_PER_TASK="1",
        PREPARE_CONFIG="conf/prepare_tiny.yaml",
        SCORE_NODES="2",
        SCORE_TP="1",
        TEACHER_NEMO=str(teacher_nemo),
        SCORE_CONFIG="conf/score_tiny.yaml",
        SCORE_OVERRIDES="what=teacher tokenizer=null overwrite=true",
        TRAIN_CONFIG="conf/train_store_tiny.yaml",
        TRAIN_NODES="2",
        TRAIN_TP="2",
        STUDENT_NEMO="",
        TOKENIZER="examples/tiny/tokenizer",
        EVAL_CONFIG="conf/eval_tiny.yaml",
        EVAL_LABEL="tiny",
        SCORE_TIME="00:20:00",
        TRAIN_TIME="00:20:00",
        EXPORT_TIME="00:20:00",
        EVAL_TIME="00:20:00",
    )
    driver_out = tmp_path / "driver.out"
    proc = slurm_cluster.run(
        ["sbatch", "--wait", f"--output={driver_out}", "slurm/distill_70b_to_8b.sh"], check=False, env=env
    )
    assert proc.returncode == 0, proc.stderr + _read(driver_out)
    driver = _read(driver_out)
    # The driver dry-ran both GPU stages (here on CPU nodes) before submitting them.
    for layout in (r"forward only, TP=1 PP=1 DP=2", r"training, TP=2 PP=1 CP=1 DP=1"):
        assert re.search(rf"^memory estimate per GPU \({layout}\).* fits", driver, re.M), driver
    jobs = dict(re.findall(r"^(score|train|export|eval): job (\d+)", driver, re.M))
    assert list(jobs) == ["score", "train", "export", "eval"], _read(driver_out)
    infos: dict[str, dict[str, Any]] = {}
    for stage, job_id in jobs.items():
        infos[stage] = slurm_cluster.wait_job(int(job_id), timeout=JOB_TIMEOUT_S)
        log = _read(run_root / "logs" / f"dcod-{stage}-{job_id}.out")
        assert infos[stage]["JobState"] == "COMPLETED", (stage, infos[stage], log)
    assert infos["train"]["NumNodes"] == "2" and infos["train"]["NodeList"] == "node[1-2]", infos["train"]
    for before, after in (("score", "train"), ("train", "export"), ("export", "eval")):  # chained
        assert infos[before]["EndTime"] <= infos[after]["StartTime"], (infos[before], infos[after])
    assert _train_steps(run_root / "train") == list(range(1, STEPS + 1))
    _assert_same_weights(run_root / "train", tiny_run[0] / "train")  # the same run as the tiny script
    export_log = _read(run_root / "logs" / f"dcod-export-{jobs['export']}.out")
    if "not implemented yet" not in export_log:
        assert (run_root / "export" / "hf" / "config.json").is_file(), _read(run_root / "logs" / "export.log")
        assert (run_root / "export" / "nemo" / "context").is_dir(), _read(run_root / "logs" / "export.log")
