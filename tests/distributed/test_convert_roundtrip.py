"""HF -> NeMo -> HF on tiny random models of every family, and a TP=2-trained checkpoint -> HF / NeMo.

One module fixture imports a tiny random Llama 3.1 (llama3 RoPE scaling, untied, sharded
safetensors), Qwen2 (QKV bias, tied embeddings) and Qwen3 (QK-norm, head_dim != hidden/heads,
tied) with the real ``nemo-dcod import`` command. Every norm weight and bias of those models is
random (``tests/helpers/hf_tiny.py``): a converter that skips one changes the logits. Then:

* logits of the imported checkpoints, loaded by Megatron at TP=1 here, at TP=2 and PP=2 in two
  gloo processes and at TP=2 x PP=2 in four (Megatron's forward-only pipeline schedule), against
  transformers' logits of the source: max |diff| <= 1e-4 in fp32;
* NeMo's silent skip is caught: with our local-spec norm fix switched off the import fails with
  the names of the skipped tensors and leaves nothing behind; a failed verification likewise;
* export back to HF: every tensor bit-identical to the source, config and tokenizer (with its
  chat template) carried, ``AutoModelForCausalLM`` loads it;
* ``nemo-dcod train`` 3 steps at TP=2 from the imported Llama, then export: the HF folder's logits
  equal the trained NeMo checkpoint's (<= 1e-4), and the plain NeMo checkpoint loads (context and
  weights) in a process where ``nemo_dcod`` cannot be imported, while the training checkpoint does not.

    .venv/bin/pytest tests/distributed/test_convert_roundtrip.py -q -x   # ~7 min on 2 CPU cores
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.dist_utils import run_distributed
from helpers.hf_tiny import CHAT_TEMPLATE, PROMPTS, hf_logits, make_hf_checkpoint, shard_files
from helpers.paths import ROOT
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FAMILIES = ("llama", "qwen2", "qwen3")
TOL = 1e-4
NEMO_DCOD = str(Path(sys.executable).with_name("nemo-dcod"))
TRAIN_TINY = str(ROOT / "conf" / "train_tiny.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(args: list[str], log: Path, timeout: float = 400.0) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=timeout)
    log.write_text(out.stdout + out.stderr)
    return out


def _ok(args: list[str], log: Path) -> str:
    out = _run(args, log)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-40:])
        pytest.fail(f"{' '.join(args[:2])} exited {out.returncode} (log {log}):\n{tail}")
    return out.stdout


def _rows() -> list[torch.Tensor]:
    """Prompt rows (word-level ids) and one row of random ids over the whole vocabulary."""
    from helpers.hf_tiny import make_tokenizer

    tok = make_tokenizer()
    rows = [torch.tensor(tok(p)["input_ids"]) for p in PROMPTS]
    rows.append(torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(7)))
    return rows


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in shard_files(folder):
        out.update(load_file(folder / name))
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """family -> (HF source folder, NeMo checkpoint made by `nemo-dcod import`)."""
    root = tmp_path_factory.mktemp("convert")
    out = {}
    for i, family in enumerate(FAMILIES):
        shard = "200KB" if family == "llama" else None
        src = make_hf_checkpoint(root / f"hf_{family}", family, seed=10 + i, max_shard_size=shard)
        ckpt = root / f"nemo_{family}"
        stdout = _ok(
            [NEMO_DCOD, "import", "--hf", str(src), "--out", str(ckpt), "verify.random_rows=1"],
            root / f"import_{family}.log",
        )
        assert "verify HF -> NeMo" in stdout and ": ok" in stdout
        out[family] = (src, ckpt)
    return out


def _nemo_logits_tp(
    rank: int, world: int, checkpoints: list[str], rows: list[torch.Tensor], pp: int = 1
) -> Any:
    """Per checkpoint: (model class in its context, vocab rows on this rank, gathered logits per row).

    TP = world / pp. With pp > 1 the logits are the last stage's (None on the others).

    Runs in forked gloo workers only: once this process has used gloo, a later fork crashes in
    gloo (its transport device outlives the process group and its loop thread is not forked).
    """
    from nemo_dcod.model.loading import load_nemo_model, megatron_parallel, nemo_logits
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode

    enable_cpu_mode()
    results = []
    for ckpt in checkpoints:
        with megatron_parallel(world // pp, pp):
            mcore, model = load_nemo_model(Path(ckpt))
            # The output layer's rows on the last stage (the embedding's when they are tied: the
            # output layer then holds no weight of its own at PP = 1), the embedding's elsewhere.
            weight = mcore.output_layer.weight if mcore.post_process else None
            if weight is None:
                weight = mcore.shared_embedding_or_output_weight()
            shard_rows = weight.shape[0]
            results.append((type(model).__name__, shard_rows, nemo_logits(mcore, rows)))
    return results


def _max_diff(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    return max(float((r - o[..., : r.shape[-1]]).abs().max()) for r, o in zip(reference, other, strict=True))


def test_import_matches_transformers_at_tp1_and_tp2(imported: dict[str, tuple[Path, Path]]) -> None:
    rows = _rows()
    reference = {f: [hf_logits(src, r[None])[0] for r in rows] for f, (src, _) in imported.items()}
    for family, (_, ckpt) in imported.items():
        report = json.loads((ckpt / "conversion.json").read_text())
        assert report["verify"]["passed"] and report["verify"]["max_abs_logit_diff"] <= TOL
        assert report["coverage"]["local_spec_norms_remapped"] == 8  # 4 layers x 2 norms
        tied = report["coverage"]["source_tied_aliases"]
        assert tied == ([] if family == "llama" else ["lm_head.weight"])
    checkpoints = [str(c) for _, c in imported.values()]
    (single,) = run_distributed(_nemo_logits_tp, 1, checkpoints, rows, timeout=300)
    sharded = run_distributed(_nemo_logits_tp, 2, checkpoints, rows, timeout=300)
    expected_class = {"llama": "LlamaModel", "qwen2": "Qwen2Model", "qwen3": "Qwen3Model"}
    for i, family in enumerate(imported):
        model_class, rows_tp1, logits_tp1 = single[i]
        _, rows_tp2, logits_tp2 = sharded[0][i]
        assert model_class == expected_class[family]
        assert (rows_tp1, rows_tp2) == (256, 128)  # the vocabulary really was split
        assert _max_diff(reference[family], logits_tp1) <= TOL, family
        assert _max_diff(reference[family], logits_tp2) <= TOL, family
        assert _max_diff(logits_tp2, sharded[1][i][2]) == 0.0  # both ranks gathered the same logits


def test_import_matches_transformers_at_pp2_and_tp2_pp2(imported: dict[str, tuple[Path, Path]]) -> None:
    """Pipeline stages through Megatron's forward-only schedule (p2p over gloo), each family: Qwen's
    tied embeddings are loaded on both ends of the pipeline."""
    rows = _rows()
    reference = {f: [hf_logits(src, r[None])[0] for r in rows] for f, (src, _) in imported.items()}
    checkpoints = [str(c) for _, c in imported.values()]
    pp2 = run_distributed(_nemo_logits_tp, 2, checkpoints, rows, 2, timeout=300)
    tp2_pp2 = run_distributed(_nemo_logits_tp, 4, checkpoints, rows, 2, timeout=400)
    for i, family in enumerate(imported):
        assert pp2[0][i][2] is None and tp2_pp2[0][i][2] is None  # first stage: no logits
        _, rows_pp2, logits_pp2 = pp2[1][i]
        _, rows_tp2_pp2, logits_tp2_pp2 = tp2_pp2[2][i]  # ranks 2, 3: the last stage's TP pair
        assert (rows_pp2, rows_tp2_pp2) == (256, 128)
        assert _max_diff(reference[family], logits_pp2) <= TOL, family
        assert _max_diff(reference[family], logits_tp2_pp2) <= TOL, family
        assert _max_diff(logits_tp2_pp2, tp2_pp2[3][i][2]) == 0.0


def test_tokenizer_travels_with_the_checkpoint(imported: dict[str, tuple[Path, Path]]) -> None:
    from nemo.lightning import io

    for _, ckpt in imported.values():
        tokenizer = io.load_context(str(ckpt), subpath="model").tokenizer
        assert tokenizer.tokenizer.chat_template == CHAT_TEMPLATE
        assert len(tokenizer.tokenizer) == 256
        assert (ckpt / "context" / "nemo_tokenizer" / "tokenizer.json").is_file()


SKIPPED_NORMS = textwrap.dedent(
    """
    import sys

    from nemo_dcod.convert import hf_import
    from nemo_dcod.convert.config import ImportConfig, VerifySection
    from nemo_dcod.convert.coverage import ConversionError
    from nemo_dcod.convert.verify import VerificationError

    if __name__ == "__main__":
        src, out = sys.argv[1], sys.argv[2]
        original = hf_import.copy_local_norms
        hf_import.copy_local_norms = lambda source, target: 0  # NeMo's mapping alone
        try:
            hf_import.run_import(ImportConfig(hf=src, out=out))
        except ConversionError as exc:
            print("CONVERSION_ERROR", exc)
        hf_import.copy_local_norms = original
        try:
            hf_import.run_import(ImportConfig(hf=src, out=out, verify=VerifySection(tolerance=1e-12)))
        except VerificationError as exc:
            print("VERIFICATION_ERROR", exc)
    """
)


def test_skipped_weights_and_failed_verification_leave_nothing(
    imported: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """NeMo's Qwen2 mapping names the norms as TE does; without our fix NeMo only warns."""
    script = tmp_path / "skipped.py"
    script.write_text(SKIPPED_NORMS)
    work = tmp_path / "work"
    work.mkdir()
    stdout = _ok(
        [sys.executable, str(script), str(imported["qwen2"][0]), str(work / "nemo")], tmp_path / "log"
    )
    assert "CONVERSION_ERROR import: the conversion is incomplete" in stdout
    assert "8 source tensor(s) were not converted: model.layers.0.input_layernorm.weight" in stdout
    assert "8 target tensor(s) were left at their initial value: decoder.layers.0.input_layernorm" in stdout
    assert "VERIFICATION_ERROR verify HF -> NeMo" in stdout and "nothing was written" in stdout
    assert sorted(p.name for p in work.iterdir()) == []


def test_round_trip_is_bit_identical(imported: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for family, (src, ckpt) in imported.items():
        out = tmp_path / f"hf_{family}"
        shard = ["max_shard_size=200KB"] if family == "llama" else []
        stdout = _ok(
            [NEMO_DCOD, "export", "--checkpoint", str(ckpt), "--hf-out", str(out), *shard], tmp_path / "log"
        )
        assert "verify NeMo -> HF" in stdout and "peak RSS" in stdout
        before, after = _safetensors(src), _safetensors(out)
        assert sorted(before) == sorted(after), family
        for name, tensor in before.items():
            assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), (family, name)
        if family == "llama":
            assert (out / "model.safetensors.index.json").is_file() and len(shard_files(out)) >= 2
        a, b = AutoConfig.from_pretrained(src).to_dict(), AutoConfig.from_pretrained(out).to_dict()
        for key in (
            "rope_scaling",
            "rope_theta",
            "tie_word_embeddings",
            "vocab_size",
            "head_dim",
            "rms_norm_eps",
        ):
            if key in a:  # Qwen2 configs have no head_dim; NeMo's exporter writes hidden / heads
                assert a[key] == b[key], (family, key)
        assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
        assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.config.architectures == AutoConfig.from_pretrained(src).architectures


BLOCKED_LOAD = textwrap.dedent(
    """
    import sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "nemo_dcod" or name.startswith("nemo_dcod."):
                raise ImportError(f"{name} is blocked: NeMo alone must load this checkpoint")

    sys.meta_path.insert(0, _Block())

    def main(path, port):
        import torch.distributed as dist
        from megatron.core import dist_checkpointing, parallel_state
        from nemo.lightning import io

        model = io.load_context(path, subpath="model")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        parallel_state.initialize_model_parallel()
        model.config.perform_initialization = False
        model.config.use_cpu_initialization = True
        mcore = model.config.configure_model(model.tokenizer)
        sharded = mcore.sharded_state_dict(prefix="module.")
        loaded = dist_checkpointing.load(sharded, path + "/weights")
        mcore.load_state_dict({k.removeprefix("module."): loaded[k] for k in sharded})
        print("LOADED", type(model).__name__, type(model.tokenizer).__name__, "nemo_dcod" in sys.modules)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
    """
)


def test_trained_tp2_checkpoint_exports_to_hf_and_plain_nemo(
    imported: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    from helpers.ports import free_port

    src, init = imported["llama"]
    run = tmp_path / "run"
    _ok(
        [
            NEMO_DCOD,
            "train",
            "--config",
            TRAIN_TINY,
            f"run_dir={run}",
            f"model.init_from={init}",
            "data.vocab_size=256",
            "data.seq_length=32",
            "trainer.max_steps=3",
            "trainer.ckpt_every_n_steps=3",
            "trainer.val_check_interval=0",
            "optim.warmup_steps=1",
        ],
        tmp_path / "train.log",
    )
    (trained,) = sorted((run / "checkpoints").glob("*-last"))
    hf_out, nemo_out = tmp_path / "hf", tmp_path / "nemo"
    stdout = _ok(
        [
            NEMO_DCOD,
            "export",
            "--checkpoint",
            str(trained),
            "--hf-out",
            str(hf_out),
            "--nemo-out",
            str(nemo_out),
        ],
        tmp_path / "export.log",
    )
    assert "verify NeMo -> plain NeMo: max |dlogit| 0.000e+00" in stdout and "verify NeMo -> HF" in stdout

    rows = _rows()
    ((model_class, _, trained_logits),) = run_distributed(_nemo_logits_tp, 1, [str(trained)], rows)[0]
    assert model_class == "DistillGPTModel"
    assert "tensor_model_parallel_size: 2" in (trained / "context" / "model.yaml").read_text()
    exported = [hf_logits(hf_out, r[None])[0] for r in rows]
    assert _max_diff(exported, trained_logits) <= TOL
    source = [hf_logits(src, r[None])[0] for r in rows]
    assert _max_diff(source, exported) > 1e-2  # training moved the weights: the comparison is not vacuous

    script = tmp_path / "blocked_load.py"
    script.write_text(BLOCKED_LOAD)
    loaded = _run([sys.executable, str(script), str(nemo_out), str(free_port())], tmp_path / "blocked.log")
    assert loaded.returncode == 0 and "LOADED LlamaModel AutoTokenizer False" in loaded.stdout, loaded.stderr[
        -3000:
    ]
    refused = _run([sys.executable, str(script), str(trained), str(free_port())], tmp_path / "blocked2.log")
    assert refused.returncode != 0 and "is blocked: NeMo alone" in refused.stderr
