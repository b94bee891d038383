"""``nemo-dcod export``: a NeMo 2 checkpoint -> a Hugging Face folder and/or a plain NeMo 2 checkpoint.

    nemo-dcod export --checkpoint runs/tiny/checkpoints --hf-out out/hf nemo_out=out/nemo

Two deliverables, each written completely or not at all (:mod:`nemo_dcod.convert.staging`):

* **the plain NeMo 2 checkpoint** (``nemo_out``): ``context/`` + ``weights/`` whose context names
  only NeMo classes: the family's model class (``llm.LlamaModel``, ``llm.Qwen2Model``,
  ``llm.Qwen3Model``) with NeMo's own data and forward steps, TP = PP = 1, NeMo's default layer
  spec, the tokenizer. A checkpoint written by ``nemo-dcod train`` records our
  ``DistillGPTModel`` and our steps; NeMo without this package cannot load that context. The
  weights are read at TP = PP = 1 whatever layout they were saved with (Megatron's distributed
  checkpoints reshard on load) and saved by NeMo's own checkpoint writer, without optimizer state.
* **the Hugging Face folder** (``hf_out``): NeMo's HF exporter of the family (its mapping and HF
  config), through our subclass that fixes what NeMo 2.7.3 gets wrong (local-spec norm names,
  tied Qwen2 embeddings, Qwen3's hard-coded token ids, vocabulary taken from the tokenizer) and
  checks that every tensor was converted (:mod:`nemo_dcod.convert.coverage`). It writes sharded
  safetensors with their index, ``config.json``, ``generation_config.json`` and the tokenizer with
  its chat template; ``transformers.AutoModelForCausalLM.from_pretrained`` loads it. Its weights
  are in the checkpoint's dtype or in ``dtype`` (an fp32 training run exported as bf16: rounded
  to nearest even, and verified against the checkpoint rounded alike).

Memory: the NeMo model is loaded once; the HF model is created without initialisation
(untouched memory is never paged in) and its parameters become the converted tensors, most of
which are views of the NeMo ones (only QKV is re-laid out). Peak RSS is measured and reported.
NeMo's ``llm.export_ckpt`` first loads the whole model once more only to ask whether it is a
ModelOpt model; we call the exporter it would then call (NeMo's connector protocol) directly.
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from nemo_dcod.convert.architectures import FAMILIES, Family
from nemo_dcod.convert.config import ExportConfig
from nemo_dcod.convert.coverage import Coverage, megatron_module, nemo_source, parameter_storage
from nemo_dcod.convert.hf_import import InputError, end_distributed
from nemo_dcod.convert.staging import refuse_existing, staged_directory
from nemo_dcod.parallel.threads import set_cpu_threads

__all__ = ["family_of_nemo", "plain_nemo_model", "run_export", "write_nemo_checkpoint"]

# Fields of a training config that name our code or a training layout: dropped (-> NeMo's defaults).
_TRAINING_ONLY = ("forward_step_fn", "data_step_fn", "calculate_per_token_loss", "transformer_layer_spec")
_OUR_CODE = re.compile(rb"\bnemo_dcod\.")  # a module path of ours (not a folder name) in a context file
_SINGLE_LAYOUT = {
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "virtual_pipeline_model_parallel_size": None,
    "context_parallel_size": 1,
    "sequence_parallel": False,
}


def family_of_nemo(config: Any) -> Family:
    """The family of a NeMo ``GPTConfig`` (by class: Qwen3Config is a Qwen2Config)."""
    from nemo.collections import llm

    for cls, name in ((llm.Qwen3Config, "qwen3"), (llm.Qwen2Config, "qwen2"), (llm.LlamaConfig, "llama")):
        if isinstance(config, cls):
            return FAMILIES[name]
    raise InputError(
        f"the checkpoint's model config is a {type(config).__name__}; export supports Llama, Qwen2 and Qwen3 "
        "configs (nemo_dcod.convert.architectures.FAMILIES)."
    )


def _tokenizer(model: Any, override: str | None, checkpoint: Path) -> Any:
    """NeMo tokenizer of the export: ``override`` (HF folder or NeMo checkpoint), else the context's."""
    from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer
    from nemo.lightning import io

    if override:
        path = Path(override).expanduser().resolve()
        if (path / "context").is_dir():
            tok = io.load_context(str(path), subpath="model").tokenizer
            if tok is None:
                raise InputError(f"tokenizer={path}: that NeMo checkpoint has no tokenizer either.")
            return tok
        if not path.is_dir():
            raise InputError(f"tokenizer={path}: no such folder.")
        return AutoTokenizer(str(path))
    if model.tokenizer is None:
        raise InputError(
            f"{checkpoint}: its context records no tokenizer (a run trained on the synthetic source has "
            "none); pass tokenizer=<the HF folder or the NeMo checkpoint made by `nemo-dcod import`>."
        )
    return model.tokenizer


def plain_nemo_model(model: Any, tokenizer: Any) -> Any:
    """The family's plain NeMo model with ``model``'s architecture: NeMo classes only, TP = PP = 1.

    The config is rebuilt from the arguments its context recorded (``__io__``), minus what names
    our training code or layout (:data:`_TRAINING_ONLY`, :data:`_SINGLE_LAYOUT`).
    """
    from nemo.collections import llm

    config = model.config
    family = family_of_nemo(config)
    recorded = getattr(getattr(config, "__io__", None), "__arguments__", None)
    names = list(recorded) if recorded is not None else [f.name for f in dataclasses.fields(config) if f.init]
    values = {n: getattr(config, n) for n in names if n not in _TRAINING_ONLY}
    values.update({k: v for k, v in _SINGLE_LAYOUT.items() if hasattr(config, k)})
    context_length = getattr(model, "context_length", None)
    if context_length:  # a student: its config's seq_length is the training rows' (export writes this one)
        values["seq_length"] = int(context_length)
    plain_config = type(config)(**values)
    return getattr(llm, family.model_class)(plain_config, tokenizer=tokenizer)


def _cpu_trainer() -> Any:
    from nemo.lightning import MegatronStrategy, Trainer

    strategy = MegatronStrategy(
        ddp="pytorch",
        setup_optimizers=False,
        ckpt_save_optimizer=False,
        ckpt_load_optimizer=False,
        ckpt_async_save=False,
        ckpt_parallel_load=False,
        ckpt_parallel_save=False,
    )
    return Trainer(devices=1, accelerator="cpu", strategy=strategy, logger=False, enable_checkpointing=False)


def write_nemo_checkpoint(source: Path, model: Any, out: Path) -> None:
    """Load ``source``'s weights into ``model`` (TP = PP = 1) and save both as a NeMo 2 checkpoint at ``out``.

    NeMo's own loader and writer (what its connectors' ``nemo_load`` / ``nemo_save`` do), with no
    optimizer state: ``out/context`` describes ``model``, ``out/weights`` holds its weights.
    """
    from lightning.pytorch.trainer.states import TrainerFn
    from nemo.lightning import _strategy_lib, teardown
    from nemo.lightning.ckpt_utils import ckpt_to_context_subdir
    from nemo.lightning.io.pl import TrainerContext

    model.config.perform_initialization = False  # the weights come from the checkpoint
    trainer = _cpu_trainer()
    try:
        trainer.strategy.connect(model)
        trainer.strategy.setup_environment()
        with _strategy_lib.megatron_cpu_init_context(model.config):
            model.configure_model()
        trainer.strategy.setup(trainer)
        trainer.strategy.load_checkpoint(source)
        model.config.perform_initialization = True
        trainer.state.fn = TrainerFn.FITTING  # NeMo saves model weights in this state
        out.mkdir(parents=True)
        trainer.save_checkpoint(out)
        TrainerContext.from_trainer(trainer).io_dump(ckpt_to_context_subdir(out), yaml_attrs=["model"])
    except BaseException:
        end_distributed()
        raise
    teardown(trainer, model)
    leaked = [
        p.name for p in (out / "context").rglob("*") if p.is_file() and _OUR_CODE.search(p.read_bytes())
    ]
    if leaked:
        raise RuntimeError(f"{out}/context still names nemo_dcod in {leaked}; NeMo alone could not load it.")


# --------------------------------------------------------------------------- NeMo's exporters, fixed


class _CheckedExporter:
    """Mixin over a NeMo HF exporter: fixed HF config, complete conversion, sharded output."""

    max_shard_size: str = "5GB"
    dtype: Any = None
    """torch dtype of the HF weights; None: the checkpoint's (its ``bf16`` / ``fp16`` flags)."""
    coverage: Coverage | None = None
    trust_remote_code: bool | None = None  # read by NeMo's Qwen exporters

    def hf_tokenizer(self) -> Any:
        """The transformers tokenizer inside the checkpoint's NeMo tokenizer."""
        from nemo.lightning import io

        tok = io.load_context(str(self), subpath="model").tokenizer
        return getattr(tok, "tokenizer", tok)

    @property
    def config(self) -> Any:
        """NeMo's HF config of the family, with the vocabulary, tying and token ids of this checkpoint
        (the end-of-sequence ids of the generation config the checkpoint records, as the HF model
        had them, e.g. Llama 3.1 Instruct's three; else the tokenizer's)."""
        from nemo.lightning import io

        hf_config = super().config  # type: ignore[misc]
        source = io.load_context(str(self), subpath="model.config")
        tok = self.hf_tokenizer()
        generation = getattr(source, "generation_config", None)
        hf_config.vocab_size = int(source.vocab_size)
        hf_config.tie_word_embeddings = bool(source.share_embeddings_and_output_weights)
        hf_config.bos_token_id = getattr(generation, "bos_token_id", None) or tok.bos_token_id
        hf_config.eos_token_id = getattr(generation, "eos_token_id", None) or tok.eos_token_id
        if tok.pad_token_id is not None:
            hf_config.pad_token_id = tok.pad_token_id
        return hf_config

    def apply(self, output_path: Path, **kwargs: Any) -> Path:
        """Load the NeMo model, convert (checked), save the HF folder."""
        try:
            return self._convert_and_save(Path(output_path))
        except BaseException:
            end_distributed()  # NeMo tears down only after a successful export
            raise

    def _convert_and_save(self, output_path: Path) -> Path:
        from nemo.collections.llm.gpt.model.base import torch_dtype_from_mcore_config
        from nemo.lightning import teardown
        from transformers import GenerationConfig

        source, trainer = self.nemo_load(str(self))  # type: ignore[attr-defined]
        dtype = self.dtype or torch_dtype_from_mcore_config(source.config)
        # The local spec keeps its norms in fp32 whatever params_dtype is; the HF model holds every
        # tensor in one dtype and NeMo's mapping asserts that no target dtype changes. A narrower
        # export dtype rounds here, to nearest even (fp32 -> bf16 as released checkpoints are made).
        megatron_module(source).to(dtype)
        target = self.init(dtype)  # type: ignore[attr-defined]
        tracked = nemo_source(source)
        state = tracked.state_dict()
        if source.config.share_embeddings_and_output_weights and "output_layer.weight" not in state:
            # Tied: Megatron's output layer *is* the embedding. Exporters that map output_layer
            # (Qwen2's, unconditionally) read it under that name; tie_weights() below re-ties.
            dict.__setitem__(
                state, "output_layer.weight", dict.__getitem__(state, "embedding.word_embeddings.weight")
            )
        before = parameter_storage(target)
        target = self.convert_state(tracked, target)  # type: ignore[attr-defined]
        if target.config.tie_word_embeddings:
            target.tie_weights()
        renamed = getattr(tracked, "local_norms_renamed", 0)
        self.coverage = Coverage.measure("export", tracked, target, before, norms_remapped=renamed)
        self.coverage.check()
        generation = getattr(source.config, "generation_config", None)
        if not isinstance(generation, GenerationConfig):
            cfg = target.config
            generation = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
        target.generation_config = generation
        target.save_pretrained(output_path, max_shard_size=self.max_shard_size, safe_serialization=True)
        self.hf_tokenizer().save_pretrained(output_path)
        del target, tracked, state
        teardown(trainer, source)
        return Path(output_path)


def _exporter_classes() -> dict[str, type]:
    from nemo.collections.llm.gpt.model.llama import HFLlamaExporter
    from nemo.collections.llm.gpt.model.qwen2 import HFQwen2Exporter
    from nemo.collections.llm.gpt.model.qwen3 import HFQwen3Exporter

    class LlamaExporter(_CheckedExporter, HFLlamaExporter):
        """NeMo's Llama exporter, checked."""

    class Qwen2Exporter(_CheckedExporter, HFQwen2Exporter):
        """NeMo's Qwen2 exporter, checked; tied embeddings stay tied."""

    class Qwen3Exporter(_CheckedExporter, HFQwen3Exporter):
        """NeMo's Qwen3 exporter, checked; token ids from the tokenizer, not Qwen's."""

    return {"LlamaModel": LlamaExporter, "Qwen2Model": Qwen2Exporter, "Qwen3Model": Qwen3Exporter}


# --------------------------------------------------------------------------- the stage


# ExportConfig.dtype -> the HF weights' torch dtype (None: the checkpoint's).
_DTYPES: dict[str, Any] = {
    "checkpoint": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


def _peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _folder_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def _check_checkpoint(path: Path) -> Path:
    """The checkpoint to export: ``path`` itself when it is a NeMo 2 checkpoint, else the newest
    complete one inside it (a run's ``checkpoints/`` folder, as ``score`` takes it)."""
    from nemo_dcod.train.checkpoints import checkpoint_problem, newest_complete_checkpoint

    if not path.is_dir():
        raise InputError(f"checkpoint={path}: no such folder.")
    if (path / "context").is_dir() or (path / "weights").is_dir():
        missing = [name for name in ("context", "weights") if not (path / name).is_dir()]
        if missing:
            raise InputError(
                f"checkpoint={path}: not a NeMo 2 checkpoint (no {' or '.join(missing)}/); point it at a "
                "folder holding context/ and weights/, or at a run's checkpoints/ folder."
            )
        return path
    newest = newest_complete_checkpoint(path)
    if newest is None:
        raise InputError(
            f"checkpoint={path}: not a NeMo 2 checkpoint (no context/ and weights/) nor a folder holding a "
            "complete one (e.g. <run_dir>/checkpoints)."
        )
    problem = checkpoint_problem(newest)
    assert problem is None, problem  # newest_complete_checkpoint returns complete ones only
    return newest.resolve()


@contextmanager
def _scratch() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="nemo_dcod_export_"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """Export ``cfg.checkpoint``; returns the report (also printed, and written as ``conversion.json``).

    Raises:
        InputError: not a NeMo 2 checkpoint of a supported family, or no tokenizer.
        FileExistsError: an output exists and ``overwrite`` is false (nothing is written).
        ConversionError, VerificationError: the export is incomplete or does not compute what the
            checkpoint computes (nothing is left behind).
    """
    from nemo.lightning import io

    from nemo_dcod.convert.verify import compare_hf_nemo, compare_nemo_nemo
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode

    checkpoint = Path(cfg.checkpoint).expanduser().resolve()
    export_dtype = _DTYPES[cfg.dtype]
    hf_out = Path(cfg.hf_out).expanduser().resolve() if cfg.hf_out else None
    nemo_out = Path(cfg.nemo_out).expanduser().resolve() if cfg.nemo_out else None
    checkpoint = _check_checkpoint(checkpoint)
    for out in (hf_out, nemo_out):
        if out is not None:
            refuse_existing(out, cfg.overwrite)
    enable_cpu_mode()
    set_cpu_threads()
    model = io.load_context(str(checkpoint), subpath="model")
    family = family_of_nemo(model.config)
    report: dict[str, Any] = {
        "source": str(checkpoint),
        "family": family.name,
        "source_class": type(model).__name__,
    }
    written: list[Path] = []
    with ExitStack() as stack:
        # The plain NeMo form: always needed as the exporter's input unless the checkpoint is one.
        plain = (
            type(model).__name__ == family.model_class and model.tokenizer is not None and not cfg.tokenizer
        )
        if nemo_out is not None or not plain:
            tokenizer = _tokenizer(model, cfg.tokenizer, checkpoint)
            if nemo_out is not None:
                target = stack.enter_context(staged_directory(nemo_out, cfg.overwrite))
                written.append(target)
            else:
                target = stack.enter_context(_scratch()) / "nemo"
            write_nemo_checkpoint(checkpoint, plain_nemo_model(model, tokenizer), target)
            if cfg.verify.enabled:
                result = compare_nemo_nemo(checkpoint, target, cfg.verify)
                report["verify_nemo"] = result.summary()
                print(result.describe("NeMo -> plain NeMo"))
                result.check("NeMo -> plain NeMo")
            nemo_checkpoint = target
        else:
            nemo_checkpoint = checkpoint
        if hf_out is not None:
            staging = stack.enter_context(staged_directory(hf_out, cfg.overwrite))
            written.append(staging)
            exporter = _exporter_classes()[family.model_class](str(nemo_checkpoint))
            exporter.max_shard_size = cfg.max_shard_size
            exporter.dtype = export_dtype
            exporter(output_path=staging)  # NeMo's Connector.__call__ -> our apply()
            report["coverage"] = exporter.coverage.summary() if exporter.coverage else None
            if cfg.verify.enabled:
                result = compare_hf_nemo(staging, nemo_checkpoint, cfg.verify, nemo_round_to=export_dtype)
                report["verify_hf"] = result.summary()
                print(result.describe("NeMo -> HF"))
                result.check("NeMo -> HF")
            report["hf_weight_bytes"] = _folder_bytes(staging, "*.safetensors")
            written_config = json.loads((staging / "config.json").read_text())
            report["hf_dtype"] = written_config.get("dtype") or written_config.get("torch_dtype")
        report["peak_rss_bytes"] = _peak_rss_bytes()
        weights = report.get("hf_weight_bytes") or _folder_bytes(nemo_checkpoint / "weights")
        report["peak_rss_over_weights"] = report["peak_rss_bytes"] / max(weights, 1)
        for folder in written:
            (folder / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    peak_gib = report["peak_rss_bytes"] / 1024**3
    print(
        f"nemo-dcod export: {checkpoint} -> {', '.join(str(p) for p in (hf_out, nemo_out) if p)}; "
        f"peak RSS {peak_gib:.2f} GiB ({report['peak_rss_over_weights']:.2f}x the weights)"
    )
    return report
