#!/usr/bin/env bash
# Fill .gpu_wheels/ (git-ignored) with what the lent GPU machine lacks, for scripts/gpu_check.sh.
#
# The GPU machine (its image: scripts/gpu_image.txt) has Python 3.12, torch + CUDA, transformers,
# lightning, numpy 2, scipy, pandas, pyarrow, ... but no megatron-core or NeMo, and no network; a
# device call carries at most 64 MiB with the working tree. This carries only what the image
# lacks (NeMo's LLM collection and what it imports at start, found by simulating the image on CPU:
# scripts/gpu_sim.sh), plus REPLACE: the image has these, but its versions break NeMo. They are
# carried as one xz-compressed tar of the wheels made smaller: test suites and test data, other
# platforms' CBC binaries in PuLP and leptonai's web UI assets removed, shared libraries stripped
# of symbols (`strip --strip-unneeded`; not the auditwheel-vendored ones in <pkg>.libs/, which
# stripping breaks), stored uncompressed so that xz sees the bytes. DEST also gets wheels.txt
# (the wheels) and replace.txt (REPLACE's names), read by install_wheels (scripts/gpu_install.sh).
#
# Usage: bash scripts/gpu_wheels.sh [DEST]      (default .gpu_wheels; ~2 min)
# Prints the wheels' sizes and what one device call would carry (the checkout's files that travel
# + DEST), and fails if that is over 40 MiB (GPU_WHEELS_LIMIT_MIB). Needs pip (PyPI), strip
# (binutils) and xz.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.gpu_wheels}
py=${GPU_PYTHON_VERSION:-3.12}
python=${PYTHON:-python3}
# The device tool carries 64 MiB a call; 40 leaves room for the tree to grow and for carried results.
limit_mib=${GPU_WHEELS_LIMIT_MIB:-40}

# Exact versions: requirements/lock.txt's where it has them (the stack tested on CPU), else
# what the lock's environment resolved. Only what the image lacks (scripts/gpu_image.txt lists
# what it has; a name from there is refused below unless it is a replacement). megatron-core pins
# numpy<2; the image's numpy 2 is kept (--no-deps) and nemo_dcod puts back the np.product that
# megatron-core's dist_checkpointing calls (nemo_dcod/parallel/numpy_compat.py).
PACKAGES=(
  megatron-core==0.15.3 nemo-toolkit==2.7.3 nemo_run==0.11.1
  annotated-types==0.8.0 asciitree==1.0.0 bcrypt==5.0.0 catalogue==2.0.10 cffi==2.1.1
  contextlib2==21.6.0 cryptography==50.0.2 datasets==5.0.1 decorator==5.3.1 Deprecated==1.3.1
  dill==0.4.1 docstring_parser==0.18.0 exceptiongroup==1.3.2 fabric==3.2.3 fastapi==0.163.2
  fiddle==0.3.1 google-auth==2.63.0 graphviz==0.21 hydra-core==1.3.2 invoke==2.2.1 ledoc-ui==0.1.0
  leptonai==0.27.3 libcst==1.9.0 loguru==0.7.3 multiprocess==0.70.19 nv-one-logger-core==2.3.1
  nv-one-logger-pytorch-lightning-integration==2.3.1 nv-one-logger-training-telemetry==2.3.1
  omegaconf==2.3.0 opentelemetry-api==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2
  overrides==7.7.0 paramiko==5.1.0 prometheus-fastapi-instrumentator==7.0.0 pydantic==2.14.4
  pydantic_core==2.50.5 PyNaCl==1.6.2 sniffio==1.3.1 starlette==0.52.1 StrEnum==0.4.15 toml==0.10.2
  torchx==0.7.0 typing-inspection==0.4.5 uvicorn==0.54.0
  # llm.train builds NeMo's resiliency callbacks at start (measured: UnavailableError for
  # nvidia_resiliency_ext.ptl_resiliency.local_checkpoint_callback without them).
  nvidia-resiliency-ext==0.4.1 defusedxml==0.7.1
)
# Carried although the image has them, and installed over its copy (scripts/gpu_install.sh):
# the image's lightning 2.6.6 breaks `import nemo.lightning` (NeMo 2.7.3's one-logger callback:
# "OneLoggerPTLTrainer.save_checkpoint: weights_only must be a supertype of Optional[bool]").
REPLACE=(lightning==2.4.0)
# nvidia-modelopt: `import nemo.collections.llm, nemo.lightning` works without it (llm.api's
# names are then missing), but training does not: NeMo 2.7.3's GPTModel.configure_model and
# MegatronStrategy's checkpoint save/load import nemo.collections.llm.modelopt, which imports
# modelopt (found 2026-12-03). Its scipy is the image's. Carried unless GPU_WHEELS_LLM_API=0.
LLM_API_PACKAGES=(
  nvidia-modelopt==0.37.0 PuLP==3.3.2 torchprofile==0.1.0 zarr==2.18.7 numcodecs==0.15.2
)
if [ "${GPU_WHEELS_LLM_API:-1}" != 0 ]; then PACKAGES+=("${LLM_API_PACKAGES[@]}"); fi
PACKAGES+=("${REPLACE[@]}")
# Published as source only (pure Python): built here into py3-none-any wheels.
SDIST_ONLY=(antlr4-python3-runtime==4.9.3 wget==3.2)

# Refuse to carry what the image has (scripts/gpu_install.sh would keep the image's copy and never
# install it) unless it is a replacement.
$python - scripts/gpu_image.txt "${REPLACE[*]}" "${PACKAGES[@]}" "${SDIST_ONLY[@]}" <<'EOF'
import re, sys
norm = lambda spec: re.sub(r"[-_.]+", "-", re.split(r"[=<>\[ ]", spec)[0]).lower()
lines = [l for l in open(sys.argv[1]).read().splitlines() if not l.startswith("#")]
image = {norm(word.lstrip("-")) for l in lines for word in l.split()}
replace = {norm(s) for s in sys.argv[2].split()}
on_image = sorted(norm(s) for s in sys.argv[3:] if norm(s) in image and norm(s) not in replace)
if on_image:
    sys.exit(f"gpu_wheels: the image already has {on_image} (scripts/gpu_image.txt): drop them or add them to REPLACE")
EOF

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
printf '%s\n' "${REPLACE[@]%%==*}" > "$dest/replace.txt"
# What one device call carries: the files that travel from a checkout (tracked and untracked, not
# ignored) plus everything in DEST (carried as carry=[".gpu_wheels"]).
tree=$(git ls-files -z -c -o --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
carried=$(find "$dest" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
$python - "$(stat -c %s "$dest/wheels.tar.xz")" "$carried" "$tree" "$limit_mib" "$dest" "$(wc -l < "$dest/wheels.txt")" <<'EOF'
import sys
xz, carried, tree, limit, dest, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6]
total = carried + tree
verdict = "fits" if total <= limit * 2**20 else "DOES NOT FIT"
print(f"gpu_wheels: {count} wheels, {dest}/wheels.tar.xz {xz / 2**20:.1f} MiB ({dest}/ {carried / 2**20:.1f} MiB) "
      f"+ working tree {tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB travels: {verdict} in {limit:g} MiB")
sys.exit(0 if total <= limit * 2**20 else 1)
EOF
