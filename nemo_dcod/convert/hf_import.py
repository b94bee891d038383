"""``nemo-dcod import``: a local Hugging Face checkpoint -> a NeMo 2 checkpoint, checked and verified.

    nemo-dcod import --hf /models/Llama-3.1-8B-Instruct --out /ckpt/llama8b-nemo

The conversion is NeMo's: ``llm.import_ckpt`` with NeMo's HF importer of the family
(``HFLlamaImporter``, ``HFQwen2Importer``, ``HFQwen3Importer``): its weight mapping, its
``nemo_setup`` / ``nemo_save``, its checkpoint format (``context/`` with the model, config and
tokenizer; ``weights/``, a Megatron distributed checkpoint). We subclass each importer to fix
what, in NeMo 2.7.3, breaks or silently corrupts an import (see
:mod:`nemo_dcod.convert.architectures` for the config, :mod:`nemo_dcod.convert.coverage` for the
weights), and register the subclasses with NeMo's connector registry under their own scheme
(``dcod-hf://``), next to NeMo's ``hf://`` ones, which stay untouched.

Around NeMo's conversion, :func:`run_import` adds:

* input checks before any work: the folder, every shard its index lists, a supported
  architecture, a tokenizer whose ids fit the embedding;
* the tokenizer travels with the checkpoint (NeMo copies its files into ``context/``; we stage
  them in a private temporary folder instead of NeMo's shared ``/tmp/nemo_tokenizer``);
* no partial output: NeMo writes into ``.<out>.partial-<pid>`` next to ``<out>``, which is renamed
  into place only after the conversion and its verification passed, and removed otherwise;
* ``conversion.json`` in the checkpoint: source, family, tensor counts, verification result;
* ``verify`` (default): the same prompts through transformers and the saved NeMo checkpoint
  (:mod:`nemo_dcod.convert.verify`), failing beyond a per-precision tolerance.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

from nemo_dcod.convert.architectures import (
    FAMILIES,
    Family,
    family_of,
    nemo_config_from_hf,
    unsupported_reasons,
)
from nemo_dcod.convert.config import ImportConfig
from nemo_dcod.convert.coverage import (
    Coverage,
    copy_local_norms,
    megatron_module,
    parameter_storage,
    tracked_state,
)
from nemo_dcod.convert.staging import staged_directory

__all__ = ["SCHEME", "InputError", "check_hf_folder", "end_distributed", "run_import"]

SCHEME = "dcod-hf"
REPORT = "conversion.json"


class InputError(ValueError):
    """The Hugging Face folder cannot be converted; the message says why and what to do."""


# --------------------------------------------------------------------------- input checks


def _weight_files(path: Path) -> list[Path]:
    """Every weight file the folder's index lists (or its single file); raises if any is missing."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise InputError(f"{index}: not a valid shard index ({exc}).") from exc
            files = sorted({path / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise InputError(
                    f"{path}: {len(missing)} of the {len(files)} shards listed in {index_name} are missing: "
                    f"{', '.join(missing)}. Copy or download the complete checkpoint."
                )
            return files
        if (path / single).is_file():
            return [path / single]
    raise InputError(f"{path}: no model.safetensors, pytorch_model.bin or shard index found.")


def check_hf_folder(path: Path, family: str | None = None) -> tuple[Any, Family, Any]:
    """Check a HF checkpoint folder before converting it.

    Args:
        path: the folder (``config.json``, weights, tokenizer files).
        family: the family the user expects (ours: llama | qwen2 | qwen3, or a ``nemo-dcod train``
            family such as ``llama3.1``); ``None``: whatever ``config.json`` says.

    Returns:
        ``(hf_config, family, tokenizer)``.

    Raises:
        InputError: missing folder, config, shards or tokenizer; an unsupported architecture or
            setting; a family other than expected; tokenizer ids beyond the embedding.
    """
    from transformers import AutoConfig, AutoTokenizer

    if not path.is_dir():
        raise InputError(f"hf={path}: no such folder.")
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json; is this a Hugging Face checkpoint folder?")
    _weight_files(path)
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path / 'config.json'}: transformers cannot read it: {exc}") from exc
    try:
        found = family_of(hf_config)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    reasons = unsupported_reasons(found, hf_config)
    if reasons:
        raise InputError(f"{path / 'config.json'}: " + " ".join(reasons))
    if family is not None:
        wanted = next((f for f in FAMILIES.values() if family == f.name or family in f.train_families), None)
        if wanted is None:
            names = sorted({*FAMILIES, *(t for f in FAMILIES.values() for t in f.train_families)})
            raise InputError(f"family={family!r}: must be one of {', '.join(names)}.")
        if wanted is not found:
            raise InputError(
                f"family={family!r}, but {path / 'config.json'} holds a {found.hf_architecture}; "
                "drop family= or point hf= at the right checkpoint."
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"{path}: no usable tokenizer ({exc}); the tokenizer must travel with the model."
        ) from exc
    if len(tokenizer) > hf_config.vocab_size:
        raise InputError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{hf_config.vocab_size}: ids >= {hf_config.vocab_size} would have no embedding row. "
            "Use the tokenizer that was trained with this model."
        )
    return hf_config, found, tokenizer


# --------------------------------------------------------------------------- NeMo's importers, fixed


class _CheckedImporter:
    """Mixin over a NeMo HF importer: our config, a private tokenizer folder, checked weights."""

    coverage: Coverage | None = None

    @cached_property
    def config(self) -> Any:
        """NeMo's config of the checkpoint (:func:`~nemo_dcod.convert.architectures.nemo_config_from_hf`)."""
        from transformers import AutoConfig, GenerationConfig

        try:
            generation = GenerationConfig.from_pretrained(str(self))
        except OSError:
            generation = None
        return nemo_config_from_hf(AutoConfig.from_pretrained(str(self)), generation)

    @cached_property
    def tokenizer(self) -> Any:
        """NeMo's ``AutoTokenizer`` over a private copy of the checkpoint's tokenizer files."""
        from nemo.collections.common.tokenizers.huggingface.auto_tokenizer import AutoTokenizer

        # NeMo copies the folder into context/ under its base name: keep NeMo's usual name.
        self.tokenizer_dir = tempfile.mkdtemp(prefix="nemo_dcod_")
        folder = str(Path(self.tokenizer_dir) / "nemo_tokenizer")
        return AutoTokenizer(self.save_hf_tokenizer_assets(str(self), save_path=folder))  # type: ignore[attr-defined]

    def nemo_mapping(self, source: Any, target: Any) -> Any:
        """NeMo's own ``convert_state`` of the family (overridden where NeMo's is wrong)."""
        return super().convert_state(source, target)  # type: ignore[misc]

    def convert_state(self, source: Any, target: Any) -> Any:
        """NeMo's mapping, the local-spec norms, then the completeness check (raises on a gap)."""
        tracked = tracked_state(source.state_dict(), source.config)
        module = megatron_module(target)
        # Megatron's local spec builds its norms in fp32 whatever params_dtype is; NeMo's mapping
        # asserts that no target dtype changes, so a bf16 checkpoint would fail on the norms.
        # Holding every parameter in the checkpoint's dtype stores the source values unchanged.
        module.to(self.config.params_dtype)
        before = parameter_storage(module)
        self.nemo_mapping(tracked, target)
        norms = copy_local_norms(tracked, target)
        self.coverage = Coverage.measure("import", tracked, module, before, norms_remapped=norms)
        self.coverage.check()
        return target

    def apply(self, output_path: Path, **kwargs: Any) -> Path:
        """NeMo's ``apply`` (load HF, set up, convert, save), then ``conversion.json``."""
        try:
            out = Path(super().apply(output_path, **kwargs))  # type: ignore[misc]
        except BaseException:
            end_distributed()  # NeMo tears down only after a successful save
            raise
        finally:
            folder = self.__dict__.get("tokenizer_dir")
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        report = {"source": str(self), "coverage": self.coverage.summary() if self.coverage else None}
        (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        return out


def end_distributed() -> None:
    """Destroy Megatron's parallel state and the process group NeMo's setup started, if any."""
    import torch.distributed as dist

    from nemo_dcod.parallel.state import destroy_model_parallel

    if dist.is_initialized():
        destroy_model_parallel()
        dist.destroy_process_group()


def _register() -> dict[str, type]:
    """Our importer subclasses, registered on NeMo's model classes under :data:`SCHEME`."""
    from nemo.collections import llm
    from nemo.collections.llm.gpt.model.llama import HFLlamaImporter
    from nemo.collections.llm.gpt.model.qwen2 import HFQwen2Importer
    from nemo.collections.llm.gpt.model.qwen3 import HFQwen3Importer
    from nemo.lightning import io
    from nemo.lightning.io.state import TransformFns

    class LlamaImporter(_CheckedImporter, HFLlamaImporter):
        """NeMo's Llama importer; our config (fusions, full llama3 RoPE scaling)."""

    class Qwen2Importer(_CheckedImporter, HFQwen2Importer):
        """NeMo's Qwen2 importer; tied embeddings stay tied.

        NeMo 2.7.3 maps ``lm_head.weight`` -> ``output_layer.weight`` unconditionally (and unties
        the model in its config); a tied checkpoint gets NeMo's mapping without that entry.
        """

        def nemo_mapping(self, source: Any, target: Any) -> Any:
            if not self.config.share_embeddings_and_output_weights:
                return super().nemo_mapping(source, target)
            layer = "model.layers.*."
            mapping = {
                "model.embed_tokens.weight": "embedding.word_embeddings.weight",
                layer + "self_attn.o_proj.weight": "decoder.layers.*.self_attention.linear_proj.weight",
                layer + "mlp.down_proj.weight": "decoder.layers.*.mlp.linear_fc2.weight",
                layer
                + "input_layernorm.weight": "decoder.layers.*.self_attention.linear_qkv.layer_norm_weight",
                layer
                + "post_attention_layernorm.weight": "decoder.layers.*.mlp.linear_fc1.layer_norm_weight",
                "model.norm.weight": "decoder.final_layernorm.weight",
            }
            transforms = [
                io.state_transform(
                    source_key=tuple(f"{layer}self_attn.{p}_proj.weight" for p in "qkv"),
                    target_key="decoder.layers.*.self_attention.linear_qkv.weight",
                    fn=TransformFns.merge_qkv,
                ),
                io.state_transform(
                    source_key=tuple(f"{layer}self_attn.{p}_proj.bias" for p in "qkv"),
                    target_key="decoder.layers.*.self_attention.linear_qkv.bias",
                    fn=TransformFns.merge_qkv_bias,
                ),
                io.state_transform(
                    source_key=(layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"),
                    target_key="decoder.layers.*.mlp.linear_fc1.weight",
                    fn=TransformFns.merge_fc1,
                ),
            ]
            return io.apply_transforms(source, target, mapping=mapping, transforms=transforms)

    class Qwen3Importer(_CheckedImporter, HFQwen3Importer):
        """NeMo's Qwen3 importer; our config (head_dim, max_position_embeddings)."""

    pairs: dict[str, type] = {
        "LlamaModel": LlamaImporter,
        "Qwen2Model": Qwen2Importer,
        "Qwen3Model": Qwen3Importer,
    }
    for model_name, importer in pairs.items():
        io.model_importer(getattr(llm, model_name), SCHEME)(importer)
    return pairs


_IMPORTERS: dict[str, type] | None = None


def importers() -> dict[str, type]:
    """NeMo model class name -> our importer (registered once per process)."""
    global _IMPORTERS
    if _IMPORTERS is None:
        _IMPORTERS = _register()
    return _IMPORTERS


# --------------------------------------------------------------------------- the stage


def run_import(cfg: ImportConfig) -> Path:
    """Convert ``cfg.hf`` into the NeMo 2 checkpoint ``cfg.out``; returns ``cfg.out``.

    Raises:
        InputError: bad input (nothing is written).
        FileExistsError: ``out`` exists and ``overwrite`` is false (nothing is written).
        ConversionError: NeMo's mapping skipped a tensor (nothing is left behind).
        VerificationError: the logits differ beyond the tolerance (nothing is left behind).
    """
    from nemo.collections import llm

    from nemo_dcod.convert.verify import compare_hf_nemo
    from nemo_dcod.parallel.cpu_mode import enable_cpu_mode
    from nemo_dcod.parallel.threads import set_cpu_threads

    source = Path(cfg.hf).expanduser().resolve()
    out = Path(cfg.out).expanduser().resolve()
    hf_config, family, _ = check_hf_folder(source, cfg.family)
    enable_cpu_mode()
    set_cpu_threads()
    importers()
    with staged_directory(out, overwrite=cfg.overwrite) as staging:
        model_cls = getattr(llm, family.model_class)
        model = model_cls(nemo_config_from_hf(hf_config))  # only picks the importer; built by it
        llm.import_ckpt(model, source=f"{SCHEME}://{source}", output_path=staging)
        report = json.loads((staging / REPORT).read_text())
        report["family"] = family.name
        if cfg.verify.enabled:
            result = compare_hf_nemo(source, staging, cfg.verify)
            report["verify"] = result.summary()
            print(result.describe("HF -> NeMo"))
            result.check("HF -> NeMo")
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    print(f"nemo-dcod import: {source} -> {out} ({family.hf_architecture})")
    return out
