"""``nemo-dcod score`` end to end, and ``nemo-dcod train`` from an imported Qwen with an unpadded vocabulary.

One module fixture makes a tiny random Qwen2 whose embedding has 320 rows for a 256-token tokenizer
(rows 256..319 are real, random weights: padding that is *not* a multiple of 128 x TP, as Qwen's
151936 is not), imports it with ``nemo-dcod import``, and prepares a packed store of short word
traces with its tokenizer (several documents per 32-token row, 3 shards). Every run below is the
real CLI in a subprocess (Megatron's forward-only schedule over gloo, NeMo's checkpoint loading):

* TP=1 in one process: every packed document's stored log-probs and top-k equal transformers' on
  the document *alone*, normalised over the 256 real tokens (<= 1e-4), so the block-diagonal mask
  and restarting positions work; the padded rows never enter the top-k, though the full-vocabulary
  top-k of transformers does pick them;
* TP=2, PP=2 (2 processes each) and DP=2 (2 replicas; ``what=reference``, the iw-SFT proxy: the
  student's own initial checkpoint) equal TP=1 (log-probs <= 1e-5, top-k ids equal); at DP=2 the
  replicas wrote disjoint shards, and the manifest records a reference scoring;
* a run SIGKILLed after its first shard leaves a store that :class:`PackedStore` refuses; the same
  command resumes it (only the other shards are scored) to a store byte-identical to the
  uninterrupted one; at DP=2, a replica SIGKILLed between two column renames of a shard (a real
  kill through the production write path's hook, :mod:`helpers.faults`) leaves that shard half new, and
  the relaunch ends byte-identical to an uninterrupted DP=2 run;
* a store prepared with another tokenizer is refused before any model is built, with a short diff;
* ``nemo-dcod train`` trains 2 steps at TP=2 from the imported checkpoint (320 rows, not
  ``padded_vocab_size(256, 2) = 256``): its first loss is the one the scored log-probs give.

    .venv/bin/pytest tests/distributed/test_score.py -q -x   # ~7 min on 2 CPU cores
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.paths import ROOT

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NEMO_DCOD = str(Path(sys.executable).with_name("nemo-dcod"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
REAL_VOCAB, ROWS = 256, 320
TOPK = 4
TOL_HF = 1e-4  # NeMo vs transformers, fp32
TOL_LAYOUT = 1e-5  # one model at two layouts: only the order of fp32 sums differs


def _run(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(args, capture_output=True, text=True, env=env or ENV, timeout=600)
    log.write_text(out.stdout + out.stderr)
    return out


def _ok(args: list[str], log: Path) -> str:
    out = _run(args, log)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-40:])
        pytest.fail(f"{' '.join(args[1:3])} exited {out.returncode} (log {log}):\n{tail}")
    return out.stdout


def _traces(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(250)}" for _ in range(n))

    with path.open("w") as f:
        for _ in range(count):
            f.write(
                json.dumps({"prompt": words(rng.randrange(2, 5)), "response": words(rng.randrange(3, 9))})
            )
            f.write("\n")


def _prepare(out: Path, traces: Path, tokenizer: str, config: Path | None = None) -> Path:
    from nemo_dcod.config import load_config
    from nemo_dcod.data.config import PrepareConfig
    from nemo_dcod.data.prepare import run_prepare

    overrides = [f"inputs=[{traces}]", f"tokenizer={tokenizer}", f"out_dir={out}"]
    if config is None:
        overrides += ["seq_length=32", "records_per_shard=5"]
    cfg = load_config(PrepareConfig, config, overrides)
    run_prepare(cfg, quiet=True)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The HF source, its NeMo import, and a prepared (unscored) store with its tokenizer."""
    from helpers.hf_tiny import make_hf_checkpoint

    root = tmp_path_factory.mktemp("score")
    hf = make_hf_checkpoint(root / "hf_qwen", "qwen2", seed=5, vocab_size=ROWS, tokenizer_vocab=REAL_VOCAB)
    ckpt = root / "nemo_qwen"
    _ok(
        [NEMO_DCOD, "import", "--hf", str(hf), "--out", str(ckpt), "verify.random_rows=1"],
        root / "import.log",
    )
    _traces(root / "traces.jsonl", 14, seed=0)
    store = _prepare(root / "store", root / "traces.jsonl", str(hf))
    return {"root": root, "hf": hf, "checkpoint": ckpt, "store": store}


def _score(setup: dict[str, Path], name: str, *overrides: str, env: dict[str, str] | None = None) -> Any:
    """Copy the unscored store to ``name`` and score it; the completed process and the store."""
    store = setup["root"] / name
    if not store.exists():
        shutil.copytree(setup["store"], store)
    args = [NEMO_DCOD, "score", f"checkpoint={setup['checkpoint']}", f"store={store}", f"topk={TOPK}"]
    args += ["trainer.micro_batch_size=3", *overrides]
    return _run(args, setup["root"] / f"{name}.log", env), store


def _columns(store: Path) -> dict[str, np.ndarray]:
    shards = sorted((store / "shards").iterdir())
    names = ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")
    return {n: np.concatenate([np.load(s / f"{n}.npy") for s in shards]) for n in names}


def _files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scored_tp1(setup: dict[str, Path]) -> Path:
    proc, store = _score(setup, "tp1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 shard(s)" in proc.stdout and "tokens/s" in proc.stdout
    return store


def test_tp1_equals_transformers_on_each_document_alone(setup: dict[str, Path], scored_tp1: Path) -> None:
    from transformers import AutoModelForCausalLM

    from nemo_dcod.data.store import PackedStore

    store = PackedStore(scored_tp1)  # complete: manifest lists the new columns, shards match it
    assert store.manifest["teacher"]["logprobs"] == "teacher" and store.manifest["teacher"]["topk"] == TOPK
    assert store.manifest["columns"]["teacher_topk_ids"]["shape"] == [len(store), 32, TOPK]
    model = AutoModelForCausalLM.from_pretrained(setup["hf"], dtype=torch.float32).eval()
    diff, packed_rows, padded_picked = 0.0, 0, 0
    for shard in sorted((scored_tp1 / "shards").iterdir()):
        cols = {n: np.load(shard / f"{n}.npy") for n in ("tokens", "segment_ids", *_columns(scored_tp1))}
        packed_rows += int((cols["segment_ids"].max(axis=1) >= 1).sum())
        for row, start, length, _ in np.load(shard / "documents.npy"):
            ids = torch.from_numpy(cols["tokens"][row, start : start + length].astype(np.int64))[None]
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1].double()
            padded_picked += int((logits.topk(TOPK, dim=-1).indices >= REAL_VOCAB).any(dim=-1).sum())
            ref = torch.log_softmax(logits[:, :REAL_VOCAB], dim=-1)
            span = slice(start, start + length - 1)
            got = torch.from_numpy(cols["teacher_logprobs"][row, span]).double()
            diff = max(diff, float((ref.gather(-1, ids[0, 1:, None])[:, 0] - got).abs().max()))
            top = ref.topk(TOPK, dim=-1)
            assert np.array_equal(top.indices.numpy(), cols["teacher_topk_ids"][row, span])
            diff = max(
                diff,
                float((top.values - torch.from_numpy(cols["teacher_topk_logprobs"][row, span])).abs().max()),
            )
            assert cols["teacher_logprobs"][row, start + length - 1] == 0.0  # label of another document
        pad = cols["segment_ids"] < 0
        assert (cols["teacher_logprobs"][pad] == 0).all() and (cols["teacher_topk_ids"][pad] == 0).all()
    assert diff <= TOL_HF, diff
    assert packed_rows >= 2  # documents really share rows
    assert padded_picked > 0  # transformers' full-vocabulary top-k picks padded rows; ours never does


@pytest.fixture(scope="module")
def scored_dp2_reference(setup: dict[str, Path]) -> Path:
    proc, store = _score(setup, "dp2_reference", "trainer.devices=2", "what=reference")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("tp2", ("trainer.devices=2", "parallel.tensor_model_parallel_size=2")),
        (
            "pp2",
            # One micro-batch per schedule call: every shard's rows in several windows.
            (
                "trainer.devices=2",
                "parallel.pipeline_model_parallel_size=2",
                "trainer.micro_batch_size=2",
                "trainer.micro_batches_per_call=1",
            ),
        ),
        ("dp2_reference", ("trainer.devices=2", "what=reference")),
    ],
)
def test_layouts_equal_tp1(
    setup: dict[str, Path], scored_tp1: Path, name: str, overrides: tuple[str, ...]
) -> None:
    from nemo_dcod.data.store import PackedStore

    proc, store = _score(setup, name, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference, got = _columns(scored_tp1), _columns(store)
    assert np.array_equal(reference["teacher_topk_ids"], got["teacher_topk_ids"])
    for column in ("teacher_logprobs", "teacher_topk_logprobs"):
        assert np.abs(reference[column] - got[column]).max() <= TOL_LAYOUT, column
    manifest = PackedStore(store).manifest
    if name == "dp2_reference":
        assert manifest["teacher"]["logprobs"] == "reference"
        writers = [
            json.loads((s / "score.json").read_text())["written_by"]
            for s in sorted((store / "shards").iterdir())
        ]
        assert [w["data_parallel_rank"] for w in writers] == [0, 1, 0]  # shard i -> replica i % 2
        assert {w["data_parallel_size"] for w in writers} == {2}


def _score_with_fault(setup: dict[str, Path], name: str, fault: str, *overrides: str) -> Any:
    """Score like :func:`_score`, in a subprocess that runs ``run_score`` with the hook ``fault``
    (a :mod:`helpers.faults` expression): the production code path, killed where the hook says."""
    store = setup["root"] / name
    if not store.exists():
        shutil.copytree(setup["store"], store)
    args = [
        f"checkpoint={setup['checkpoint']}",
        f"store={store}",
        f"topk={TOPK}",
        "trainer.micro_batch_size=3",
    ]
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from helpers.faults import KillAt\n"
        "from nemo_dcod.config import load_config\n"
        "from nemo_dcod.score.config import ScoreConfig\n"
        "from nemo_dcod.score.run import run_score\n"
        f"run_score(load_config(ScoreConfig, None, sys.argv[2:]), on_write={fault})\n"
    )
    tests = str(ROOT / "tests")
    return _run(
        [sys.executable, "-c", script, tests, *args, *overrides], setup["root"] / f"{name}.log"
    ), store


def test_killed_run_resumes_to_the_same_store(setup: dict[str, Path], scored_tp1: Path) -> None:
    """SIGKILL after the first shard is written (one process): refused as incomplete, resumed."""
    from nemo_dcod.data.store import IncompleteStoreError, PackedStore

    proc, store = _score_with_fault(setup, "killed", 'KillAt("shard_written")')
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])
    assert (store / "scoring.json").is_file() and (store / "shards/shard_00000/score.json").is_file()
    assert not (store / "shards/shard_00001/score.json").exists()
    with pytest.raises(IncompleteStoreError, match="did not finish writing its teacher columns"):
        PackedStore(store)
    resumed, _ = _score(setup, "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "score: shard_00000" not in resumed.stdout and "2 shard(s)" in resumed.stdout
    assert _files(store) == _files(scored_tp1)
    again, _ = _score(setup, "killed")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_kill_mid_column_write_at_dp2_resumes_to_the_same_store(
    setup: dict[str, Path], scored_dp2_reference: Path
) -> None:
    """Data-parallel replica 1 is SIGKILLed between two column renames of its first shard: that
    shard holds one new column and no ``score.json``; the relaunch rescores it (and whatever else is
    missing) to a store byte-identical to an uninterrupted DP=2 run."""
    dp2 = ["trainer.devices=2", "what=reference"]
    proc, store = _score_with_fault(setup, "killed_dp2", 'KillAt("column_saved", rank=1)', *dp2)
    assert proc.returncode != 0, proc.stdout[-2000:]
    # The surviving rank fails (its peer vanished) or sees rank 1's exit code: either way the job stops.
    assert re.search(r"rank 1 died with exit code -9|rank 0 of 2 failed", proc.stderr), proc.stderr[-3000:]
    shard = store / "shards" / "shard_00001"  # replica 1's first shard
    assert not (shard / "score.json").exists() and (store / "scoring.json").is_file()
    resumed, _ = _score(setup, "killed_dp2", *dp2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _files(store) == _files(scored_dp2_reference)


def test_another_tokenizer_and_foreign_columns_are_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    """Checks made before any model is built (in this process: no process group is started)."""
    from nemo_dcod.config import load_config
    from nemo_dcod.score.config import ScoreConfig
    from nemo_dcod.score.plan import ScoreError, plan_scoring

    tiny = ROOT / "examples" / "tiny"
    other = _prepare(
        tmp_path / "other",
        tiny / "traces.jsonl",
        str(tiny / "tokenizer"),
        ROOT / "conf" / "prepare_tiny.yaml",
    )
    cfg = load_config(ScoreConfig, None, [f"checkpoint={setup['checkpoint']}", f"store={other}"])
    with pytest.raises(ScoreError) as err:
        plan_scoring(cfg)
    text = str(err.value)
    assert "is not the store's" in text and "sizes: 209 tokens (store) vs 256 (model)" in text
    assert "id(s) map to different tokens" in text and len(text.splitlines()) <= 10
    # A store with the generation engine's log-probs: replacing them needs overwrite=true.
    cfg.store = str(setup["store"])
    assert plan_scoring(cfg) is not None
    generation = tmp_path / "generation"
    shutil.copytree(setup["store"], generation)
    manifest = json.loads((generation / "manifest.json").read_text())
    manifest["teacher"]["logprobs"] = "generation"
    (generation / "manifest.json").write_text(json.dumps(manifest))
    cfg.store = str(generation)
    with pytest.raises(ScoreError, match=r"already has teacher log-probs \(generation\).*overwrite=true"):
        plan_scoring(cfg)


def test_train_from_imported_qwen_with_unpadded_vocabulary(
    setup: dict[str, Path], scored_tp1: Path, tmp_path: Path
) -> None:
    """The bug: data.vocab_size=256 at TP=2 padded to 256 rows; the checkpoint has 320.

    Step 1's SFT loss (on the restored weights, before the update) is the mean of -log p over the
    loss tokens of the first global batch's two rows (the run's shuffled order,
    ``helpers.data_order``): exactly what ``score`` stored for them, so
    the imported weights were really restored, and train and score agree on the same model.
    """
    run = tmp_path / "run"
    args = [
        NEMO_DCOD,
        "train",
        f"run_dir={run}",
        "model.family=qwen2.5",
        f"model.init_from={setup['checkpoint']}",
        "trainer.devices=2",
        "parallel.tensor_model_parallel_size=2",
        "data.source=store",
        f"data.path={setup['store']}",
        f"data.vocab_size={REAL_VOCAB}",
        "data.seq_length=32",
        "data.num_val_samples=0",
        "loss.name=sft",
        "trainer.max_steps=2",
        "trainer.global_batch_size=2",
        "trainer.micro_batch_size=1",
        "trainer.ckpt_every_n_steps=2",
        "optim.warmup_steps=0",
    ]
    _ok(args, tmp_path / "train.log")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    from helpers.data_order import first_batch_rows, store_rows

    from nemo_dcod.data.store import PackedStore

    rows = first_batch_rows(run, len(PackedStore(scored_tp1)))  # the run's shuffled first batch
    logprobs = store_rows(scored_tp1, "teacher_logprobs", rows).astype(np.float64)
    mask = store_rows(scored_tp1, "loss_mask", rows).astype(np.float64)
    assert records[0]["loss"] == pytest.approx(-(logprobs * mask).sum() / mask.sum(), rel=1e-5)
    (trained,) = sorted((run / "checkpoints").glob("*-last"))
    assert "vocab_size: 320" in (trained / "context" / "model.yaml").read_text()
    bad = _run(
        [*args[:2], f"run_dir={tmp_path / 'bad'}", *args[3:], "parallel.tensor_model_parallel_size=3"],
        tmp_path / "bad.log",
    )
    assert bad.returncode == 2 and "does not divide the 320 vocabulary rows" in bad.stderr


def test_dry_run_reads_the_checkpoint_and_checks_the_layout(setup: dict[str, Path]) -> None:
    """`score --dry-run`: the checkpoint's architecture and the store's rows give the estimate;
    a layout the checkpoint cannot take is refused before any rank starts; nothing is written."""
    before = _files(setup["store"])
    base = [NEMO_DCOD, "score", "--dry-run", f"checkpoint={setup['checkpoint']}", f"store={setup['store']}"]
    ok = _run(
        [*base, "trainer.devices=2", "parallel.tensor_model_parallel_size=2"], setup["root"] / "dry.log"
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert re.search(r"^score: .* 2 ranks = TP 2 x PP 1 x DP 1, \d+-token rows", ok.stdout, re.M), ok.stdout
    assert re.search(
        r"^memory estimate per GPU \(forward only, TP=2 PP=1 DP=1\): [\d.]+ GiB .* fits", ok.stdout, re.M
    )
    bad = _run(
        [*base, "trainer.devices=3", "parallel.pipeline_model_parallel_size=3"], setup["root"] / "dry3.log"
    )
    assert (
        bad.returncode == 2
        and "model layers (4) not divisible by parallel.pipeline_model_parallel_size=3" in bad.stderr
    )
    assert _files(setup["store"]) == before
