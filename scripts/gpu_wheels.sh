#!/usr/bin/env bash
# Fill .gpu_wheels/ (git-ignored) with what the lent GPU machine lacks, for scripts/gpu_check.sh.
#
# The GPU machine has Python 3.12, torch + CUDA, triton, transformers and lightning, no network, and
# takes at most 64 MiB of carried files with the working tree. NeMo's LLM collection imports far
# more than that at import time (found by importing it in a venv holding only torch, transformers
# and lightning, adding each missing module's package until `import nemo.collections.llm,
# nemo.lightning`, `llm.train` and a tiny `nemo-dcod train` worked): 90 wheels, ~170 MiB as
# downloaded, dominated by pyarrow (datasets), scipy (nvidia-modelopt, imported by llm.api),
# tensorstore, onnx and pandas. They are carried as one xz-compressed tar of the same wheels made
# smaller: test suites and test data, headers and Cython sources, pyarrow's Flight/Substrait
# libraries, other platforms' CBC binaries in PuLP and leptonai's web UI assets removed, shared
# libraries stripped of symbols (`strip --strip-unneeded`; ml_dtypes shrinks 24 -> 1.5 MB; not the
# auditwheel-vendored ones in <pkg>.libs/, which stripping breaks), stored
# uncompressed so that xz sees the bytes. gpu_check.sh unpacks it and installs, with --no-deps
# --no-index, only the distributions the machine does not already have.
#
# Usage: bash scripts/gpu_wheels.sh [DEST]      (default .gpu_wheels; ~5 min, mostly xz)
#   GPU_PYTHON_VERSION=3.11 bash scripts/gpu_wheels.sh /tmp/wheels311   (for a CPU simulation)
# Prints the size of the downloaded wheels, of the slimmed ones and of DEST/wheels.tar.xz against
# the 64 MiB limit. Needs pip (PyPI), strip (binutils) and xz.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.gpu_wheels}
py=${GPU_PYTHON_VERSION:-3.12}
python=${PYTHON:-python3}
limit_mib=64

# Exact versions: requirements/lock.txt's where it has them (the stack tested on CPU), else
# what the lock's environment resolved. megatron-core pins numpy<2; the GPU's numpy 2 is kept
# (--no-deps), as it was when megatron-core 0.15.3 ran there before.
PACKAGES=(
  megatron-core==0.15.3 nemo-toolkit==2.7.3 nemo_run==0.11.1
  absl-py==2.5.1 annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.9.0 asciitree==1.0.0
  bcrypt==5.0.0 catalogue==2.0.10 cffi==2.1.1 click==8.5.1 cloudpickle==3.0.0 contextlib2==21.6.0
  cryptography==50.0.2 datasets==5.0.1 decorator==5.3.1 Deprecated==1.3.1 dill==0.4.1
  docstring_parser==0.18.0 einops==0.8.2 exceptiongroup==1.3.2 fabric==3.2.3 fastapi==0.163.2
  fiddle==0.3.1 google-auth==2.63.0 graphviz==0.21 h11==0.16.0 httpcore==1.0.9 httpx==0.27.2
  hydra-core==1.3.2 iniconfig==2.3.1 invoke==2.2.1 ledoc-ui==0.1.0 leptonai==0.27.3 libcst==1.9.0
  loguru==0.7.3 markdown-it-py==4.3.0 mdurl==0.1.2 ml_dtypes==0.5.4 multiprocess==0.70.19
  mypy_extensions==1.2.0 nv-one-logger-core==2.3.1
  nv-one-logger-pytorch-lightning-integration==2.3.1 nv-one-logger-training-telemetry==2.3.1
  omegaconf==2.3.0 onnx==1.22.0 opentelemetry-api==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2
  overrides==7.7.0 pandas==3.0.6 paramiko==5.1.0 pillow==13.0.0 pluggy==1.7.0
  prometheus-fastapi-instrumentator==7.0.0 prometheus_client==0.26.0 protobuf==5.29.6
  pyarrow==21.0.0 pydantic==2.14.4 pydantic_core==2.50.5 Pygments==2.21.0 PyNaCl==1.6.2
  pyre-extensions==0.0.32 pytest==9.2.0 python-dateutil==2.9.0.post0 rich==15.0.0
  sentencepiece==0.2.3 shellingham==1.5.4 six==1.17.0 sniffio==1.3.1 starlette==0.52.1 StrEnum==0.4.15
  tensorstore==0.1.71 tiktoken==0.7.0 toml==0.10.2 torchx==0.7.0 typer==0.29.2
  typing-inspect==0.9.0 typing-inspection==0.4.5 uvicorn==0.54.0 wrapt==2.5.2 xxhash==4.1.0
)
# nvidia-modelopt and through it scipy: `import nemo.collections.llm, nemo.lightning` works
# without them (llm.api's names are then missing), but training does not: NeMo 2.7.3's
# GPTModel.configure_model and MegatronStrategy's checkpoint save/load import
# nemo.collections.llm.modelopt, which imports modelopt (found 2026-12-03; not replacing
# llm.train by hand therefore saves nothing). They are carried unless GPU_WHEELS_LLM_API=0
# (measured: 76.1 MiB with them, over the device tool's 64 MiB; without them training fails).
LLM_API_PACKAGES=(
  nvidia-modelopt==0.37.0 scipy==1.17.1 PuLP==3.3.2 torchprofile==0.1.0 zarr==2.18.7 numcodecs==0.15.2
)
if [ "${GPU_WHEELS_LLM_API:-1}" != 0 ]; then PACKAGES+=("${LLM_API_PACKAGES[@]}"); fi
# Published as source only (pure Python): built here into py3-none-any wheels.
SDIST_ONLY=(antlr4-python3-runtime==4.9.3 wget==3.2)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/raw" "$work/slim" "$dest"
platforms=()
for p in manylinux1 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34; do
  platforms+=(--platform "${p}_x86_64")
done
echo "gpu_wheels: downloading ${#PACKAGES[@]} wheels for CPython $py (+${#SDIST_ONLY[@]} built from source)"
$python -m pip download -q --no-deps --python-version "$py" --only-binary=:all: "${platforms[@]}" \
  -d "$work/raw" "${PACKAGES[@]}"
$python -m pip wheel -q --no-deps -w "$work/raw" "${SDIST_ONLY[@]}"

$python - "$work/raw" "$work/slim" <<'EOF'
"""Rewrite each wheel without what no import needs, shared libraries stripped, stored uncompressed."""
import base64, hashlib, re, subprocess, sys, tempfile, zipfile
from pathlib import Path

raw, slim = Path(sys.argv[1]), Path(sys.argv[2])
DROP = [
    r"(^|/)tests?/",  # test suites and their data (nemo-toolkit ships a top-level tests/)
    r"^onnx/backend/test/",
    r"^pyarrow/include/", r"\.(pyx|pxd|pxi)$", r"^pyarrow/src/",
    r"^pyarrow/(lib)?_?arrow_flight", r"^pyarrow/_flight", r"^pyarrow/(lib)?_?arrow_substrait",
    r"^pyarrow/_substrait", r"^pyarrow/libarrow_python\.so(\.\d+\.\d+\.\d+)?$",
    r"^pulp/solverdir/cbc/(win|osx|linux/(arm64|i32))/",
    r"^ledoc_ui/static/",
]
drop = re.compile("|".join(DROP))
total_in = total_out = 0
for wheel in sorted(raw.glob("*.whl")):
    with zipfile.ZipFile(wheel) as zin, tempfile.TemporaryDirectory() as tmp:
        names = [n for n in zin.namelist() if not n.endswith("/")]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        kept = [n for n in names if n != record and not drop.search(n)]
        rows = []
        out = slim / wheel.name
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
            for name in kept:
                data = zin.read(name)
                # Not the libraries auditwheel vendored into <pkg>.libs/: patchelf rewrote their
                # headers, and strip leaves them unloadable (measured: scipy's OpenBLAS).
                if (re.search(r"\.so(\.[\d.]+)?$", name) and data[:4] == b"\x7fELF"
                        and not re.search(r"\.libs/", name)):
                    path = Path(tmp) / "lib.so"
                    path.write_bytes(data)
                    subprocess.run(["strip", "--strip-unneeded", str(path)], check=True)
                    data = path.read_bytes()
                info = zin.getinfo(name)
                info.compress_type = zipfile.ZIP_STORED
                zout.writestr(info, data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                rows.append(f"{name},sha256={digest},{len(data)}")
            rows.append(f"{record},,")
            zout.writestr(record, "\n".join(rows) + "\n")
    total_in += wheel.stat().st_size
    total_out += out.stat().st_size
print(f"gpu_wheels: {len(list(raw.glob('*.whl')))} wheels, {total_in / 2**20:.1f} MiB as downloaded, "
      f"{total_out / 2**20:.1f} MiB slimmed (stored uncompressed)")
EOF

echo "gpu_wheels: compressing (xz -9) ..."
tar -C "$work/slim" -cf - . | xz -9 -T0 > "$dest/wheels.tar.xz.part"
mv "$dest/wheels.tar.xz.part" "$dest/wheels.tar.xz"
(cd "$work/slim" && ls) > "$dest/wheels.txt"
size=$(stat -c %s "$dest/wheels.tar.xz")
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
$python - "$size" "$tree" "$limit_mib" "$dest" <<'EOF'
import sys
size, tree, limit, dest = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
total = size + tree
verdict = "fits" if total <= limit * 2**20 else "DOES NOT FIT"
print(f"gpu_wheels: {dest}/wheels.tar.xz {size / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB "
      f"= {total / 2**20:.1f} MiB: {verdict} in {limit:g} MiB")
sys.exit(0 if total <= limit * 2**20 else 1)
EOF
