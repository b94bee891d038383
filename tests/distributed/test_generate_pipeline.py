"""``nemo-dcod generate`` in the chain, and its resume: real processes, a real tiny teacher.

1. generate -> prepare -> train: a tiny random Llama teacher (vocabulary 32, so it ends traces
   with ``</s>`` often) writes sampled traces; ``nemo-dcod prepare --config <out>/prepare.yaml``
   reads them with no mapping of its own, leaves out the traces cut at ``max_new_tokens`` (or
   keeps them with no ``</s>``: ``cut_off=keep``), and stores the traces' sampled ids and
   log-probs, the end-of-turn's included, at exactly the trained positions; ``nemo-dcod
   train data.source=store`` trains the tiny student on that store with DisCorD at TP=1.
2. A run SIGKILLed while writing its second shard (a hook parameter of ``run_generate`` kills the
   process after the shard's second record reached its temp file) leaves that shard unfinished;
   the rerun skips the first shard, redoes the second, and ends byte-identical to an
   uninterrupted run.
3. Two workers (worker_index 0 and 1 of 2) write together exactly what one worker writes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.paths import ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.hf_tiny import make_hf_checkpoint

    return make_hf_checkpoint(tmp_path_factory.mktemp("teacher") / "hf", "llama", seed=5, vocab_size=32)


@pytest.fixture(scope="module")
def problems(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("problems") / "problems.jsonl"
    rows = [
        {"uid": f"p{i}", "question": f"w{i} w{(3 * i) % 28} w{(5 * i) % 28}", "answer": "#### 7"}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(teacher: Path, problems: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        f"inputs=[{problems}]",
        f"teacher={teacher}",
        "fields.problem=question",
        "fields.reference=answer",
        "fields.id=uid",
        "prompt_template='{problem}'",
        "sampling.samples_per_problem=2",
        "sampling.temperature=1.0",
        "sampling.max_new_tokens=24",
        "sampling.seed=3",
        "problems_per_shard=5",
        "batch_size=4",
        "grading.grader=string",
        "progress=false",
        f"out_dir={out_dir}",
        *extra,
    ]


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "nemo_dcod.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def _traces(out_dir: Path) -> list[dict[str, Any]]:
    files = sorted((out_dir / "traces").glob("shard-*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def test_generate_then_prepare_then_train(teacher: Path, problems: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    _cli("generate", *_overrides(teacher, problems, out))
    traces = _traces(out)
    assert len(traces) == 24 and {t["id"] for t in traces} == {f"p{i}" for i in range(12)}
    stopped = [t for t in traces if t["finish_reason"] == "stop"]
    assert stopped and all(t["teacher_tokens"][-1] == 2 for t in stopped)  # the end-of-turn </s> kept
    assert all(len(t["teacher_tokens"]) == len(t["teacher_logprobs"]) for t in traces)
    assert all(t["correct"] is False and t["reference"] == "7" for t in traces)  # graded, never right
    report = json.loads((out / "report.json").read_text())
    assert (
        report["ok"]
        and report["samples"] == 24
        and report["usable"] == len([t for t in stopped if t["num_tokens"]])
    )
    meta = json.loads((out / "meta" / "shard-00000.json").read_text())
    assert meta["sampling"]["temperature"] == 1.0 and meta["sampling"]["samples_per_problem"] == 2
    assert "untempered" in meta["logprobs"]

    # prepare, from the config generate wrote (its field mapping), with the teacher's tokenizer:
    # the traces cut at max_new_tokens are left out, every stopped one ends with the teacher's
    # log-prob of its end-of-turn </s> (the template writes nothing after it: no token is filled).
    store = tmp_path / "store"
    _cli("prepare", "--config", str(out / "prepare.yaml"), "seq_length=64", f"out_dir={store}")
    prep = json.loads((store / "report.json").read_text())
    assert prep["records_read"] == 24, prep
    nonempty = [t for t in traces if t["num_tokens"] > 0]  # an empty response is prepare's to skip
    kept = [t for t in nonempty if t["finish_reason"] == "stop"]
    assert 0 < len(kept) < len(nonempty), "the tiny teacher must both stop and run out of tokens"
    assert prep["records_kept"] == len(kept) == prep["stop_logprobs"], prep
    assert prep["skipped"]["cut_off"] == len(traces) - len(stopped), prep
    assert not {"teacher_tokens_mismatch", "logprob_length_mismatch"} & set(prep["skipped"]), prep
    assert prep["teacher_filled_tokens"] == 0, prep
    _check_store_logprobs(store, kept)
    # cut_off=keep: the cut-off traces too, each ending with its last sampled token (no </s>).
    kept_all = tmp_path / "store_all"
    _cli(
        "prepare",
        "--config",
        str(out / "prepare.yaml"),
        "seq_length=64",
        "cut_off=keep",
        f"out_dir={kept_all}",
    )
    prep = json.loads((kept_all / "report.json").read_text())
    assert prep["records_kept"] == len(nonempty) and prep["cut_off_kept"] == len(nonempty) - len(kept), prep
    assert prep["teacher_filled_tokens"] == 0 and prep["stop_logprobs"] == len(kept), prep
    _check_store_logprobs(kept_all, nonempty)

    run_dir = tmp_path / "train"
    manifest = json.loads((store / "manifest.json").read_text())
    _cli(
        "train",
        "--config",
        "conf/train_store_tiny.yaml",
        f"run_dir={run_dir}",
        f"data.path={store}",
        f"data.vocab_size={manifest['vocab_size']}",
        "data.seq_length=64",
        "data.num_val_samples=1",
        "parallel.tensor_model_parallel_size=1",
        "trainer.devices=1",
        "trainer.max_steps=3",
        "trainer.global_batch_size=2",
        "trainer.micro_batch_size=1",
        "trainer.val_check_interval=0",
        "trainer.ckpt_every_n_steps=3",
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in train)


def _check_store_logprobs(store: Path, traces: list[dict[str, Any]]) -> None:
    """Every stored document's trained labels are exactly a trace's teacher tokens (a stopped
    trace's ending with its </s>), with that trace's log-probs (label-aligned)."""
    from nemo_dcod.data.store import PackedStore

    by_tokens = {tuple(t["teacher_tokens"]): t["teacher_logprobs"] for t in traces}
    data = PackedStore(store)
    matched = 0
    for index in range(len(data)):
        row = data[index]
        labels, mask = row["labels"].numpy(), row["loss_mask"].numpy() > 0
        segments, teacher = row["segment_ids"].numpy(), row["teacher_logprobs"].numpy()
        for seg in set(segments[segments >= 0].tolist()):
            where = (segments == seg) & mask
            tokens = tuple(labels[where].tolist())
            lps = teacher[where]
            np.testing.assert_allclose(lps, np.asarray(by_tokens[tokens], dtype=np.float32), atol=1e-6)
            matched += 1
    assert matched == len(traces)


_KILL_SCRIPT = """
import os, signal, sys
from nemo_dcod.config import load_config
from nemo_dcod.generate.config import GenerateConfig
from nemo_dcod.generate.run import run_generate

kill_shard = int(sys.argv[1])
cfg = load_config(GenerateConfig, None, sys.argv[2:])

def kill_mid_write(event):
    if event.kind == "record" and event.shard == kill_shard and event.count == 2:
        os.kill(os.getpid(), signal.SIGKILL)

run_generate(cfg, on_event=kill_mid_write if kill_shard >= 0 else None)
"""


def _run_script(tmp_path: Path, kill_shard: int, overrides: list[str]) -> int:
    script = tmp_path / "run_generate.py"
    script.write_text(_KILL_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(kill_shard), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=ROOT,
    )
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
    return proc.returncode


def _metas(out: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "seconds"}
        for p in sorted((out / "meta").glob("*.json"))
    }


def test_a_run_killed_mid_shard_resumes_to_the_uninterrupted_output(
    teacher: Path, problems: Path, tmp_path: Path
) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _run_script(tmp_path, -1, _overrides(teacher, problems, whole)) == 0
    assert _run_script(tmp_path, 1, _overrides(teacher, problems, cut)) == -signal.SIGKILL
    # Killed while writing shard 1: shard 0 is done, shard 1 is only a temp file with two records.
    assert (cut / "meta" / "shard-00000.json").is_file() and not (cut / "meta" / "shard-00001.json").exists()
    assert not (cut / "traces" / "shard-00001.jsonl").exists()
    (temp,) = (cut / "traces").glob(".shard-00001.jsonl.*.tmp")
    assert len(temp.read_text().splitlines()) == 2
    assert not (cut / "report.json").exists()
    first = (cut / "traces" / "shard-00000.jsonl").stat().st_mtime_ns

    assert _run_script(tmp_path, -1, _overrides(teacher, problems, cut)) == 0
    assert (cut / "traces" / "shard-00000.jsonl").stat().st_mtime_ns == first  # skipped, not redone
    assert not list((cut / "traces").glob(".*.tmp"))
    names = sorted(p.name for p in (whole / "traces").iterdir())
    assert names == sorted(p.name for p in (cut / "traces").iterdir()) and len(names) == 3
    for name in names:
        assert (cut / "traces" / name).read_bytes() == (whole / "traces" / name).read_bytes(), name
    assert _metas(cut) == _metas(whole)
    drop = ("generation_seconds", "tokens_per_second")
    report = {k: v for k, v in json.loads((cut / "report.json").read_text()).items() if k not in drop}
    assert report == {
        k: v for k, v in json.loads((whole / "report.json").read_text()).items() if k not in drop
    }


def test_two_workers_write_what_one_writes(teacher: Path, problems: Path, tmp_path: Path) -> None:
    from nemo_dcod.config import load_config
    from nemo_dcod.generate.config import GenerateConfig
    from nemo_dcod.generate.run import run_generate

    one, two = tmp_path / "one", tmp_path / "two"
    run_generate(load_config(GenerateConfig, None, _overrides(teacher, problems, one)))
    first = run_generate(
        load_config(
            GenerateConfig, None, _overrides(teacher, problems, two, "worker_index=1", "num_workers=2")
        )
    )
    assert "ok" not in first  # this worker's part only: the run is not complete yet
    assert sorted(p.name for p in (two / "traces").iterdir()) == ["shard-00001.jsonl"]
    assert not (two / "report.json").exists()
    run_generate(
        load_config(
            GenerateConfig, None, _overrides(teacher, problems, two, "worker_index=0", "num_workers=2")
        )
    )
    for name in ("shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl"):
        assert (two / "traces" / name).read_bytes() == (one / "traces" / name).read_bytes(), name
    assert json.loads((two / "report.json").read_text())["ok"]
    assert (two / "prepare.yaml").is_file()
