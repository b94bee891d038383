# shellcheck shell=bash
# install_wheels PYTHON WHEEL_DIR TARGET: install the carried wheel set into TARGET, for PYTHON.
#
# Sourced by scripts/gpu_check.sh (on the GPU machine) and scripts/gpu_sim.sh (the CPU simulation
# of that machine), so the simulation installs exactly as the check does. WHEEL_DIR is what
# scripts/gpu_wheels.sh wrote: wheels.tar.xz and replace.txt (one distribution name a line).
#
# Each carried wheel is installed with --no-deps --no-index into TARGET (emptied first), which
# the caller puts first on PYTHONPATH, so that:
#   * a distribution PYTHON lacks is installed;
#   * a distribution named in replace.txt is installed even though PYTHON has it, and shadows
#     PYTHON's copy (TARGET comes first on sys.path; measured: the image's lightning 2.6.6 breaks
#     `import nemo.lightning`, our lock's 2.4.0 works);
#   * any other distribution PYTHON already has is not installed: the image's copy is kept
#     (scripts/gpu_wheels.sh does not carry those, so this only guards an older wheel set).
# The image's own site-packages is never written to. Then it checks the imports the training
# path needs at start, which fail without a replacement or a carried package:
#   megatron.core, nemo, nemo.collections.llm (and llm.train), nemo.lightning, the resiliency
#   callback llm.train loads, and that each replaced distribution now resolves to TARGET's copy.
# Returns non-zero on any failure. Needs nothing but PYTHON (pip) and tar.
install_wheels() {
  local python=$1 wheel_dir=$2 target=$3
  local archive=$wheel_dir/wheels.tar.xz
  [ -f "$archive" ] || {
    echo "install_wheels: no $archive: run scripts/gpu_wheels.sh on the CPU machine and carry .gpu_wheels"
    return 1
  }
  rm -rf "$target" "$target.unpacked"
  mkdir -p "$target"
  "$python" - "$archive" "$wheel_dir/replace.txt" "$target.unpacked" "$target" <<'EOF' || return 1
"""Unpack the carried wheels; install the missing and the replacing ones into the target."""
import importlib.metadata as md, re, subprocess, sys, tarfile
from pathlib import Path

archive, replace_file, unpacked, target = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
with tarfile.open(archive) as tar:
    tar.extractall(unpacked, filter="data")
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
replace = set()
if replace_file.is_file():
    replace = {norm(l.strip()) for l in replace_file.read_text().splitlines() if l.strip() and not l.startswith("#")}
# What this Python has of its own (the target is empty and not on sys.path yet, or is skipped).
have = {}
for dist in md.distributions():
    if dist.metadata["Name"] and not str(getattr(dist, "_path", "")).startswith(target):
        have.setdefault(norm(dist.metadata["Name"]), dist.version)
todo, kept, replaced = [], [], []
for wheel in sorted(unpacked.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    if norm(name) in replace:
        replaced.append(f"{name} {have.get(norm(name), '(absent)')} -> {version}")
        todo.append(str(wheel))
    elif norm(name) in have:
        kept.append(f"{name} {have[norm(name)]} (carried {version})")
    else:
        todo.append(str(wheel))
missing_replacements = replace - {norm(Path(w).name.split("-")[0]) for w in todo}
print(f"install_wheels: replacing {', '.join(replaced) or 'nothing'}")
print(f"install_wheels: already installed, kept: {', '.join(kept) or 'none'}")
if missing_replacements:
    print(f"install_wheels: replace.txt names {sorted(missing_replacements)} but no such wheel is carried")
    sys.exit(1)
print(f"install_wheels: installing {len(todo)} of {len(todo) + len(kept)} carried wheels into {target} (--no-deps)")
cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile",
       "--disable-pip-version-check", "--upgrade", "--target", target, *todo]
sys.exit(subprocess.run(cmd).returncode if todo else 0)
EOF
  rm -rf "$target.unpacked"
  PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$python" - "$wheel_dir/replace.txt" "$target" <<'EOF' || return 1
"""The imports the training path needs at start (each tried, all reported); replaced
distributions must come from the target."""
import importlib, importlib.metadata as md, sys, time, traceback, warnings
from pathlib import Path

warnings.filterwarnings("ignore")
failed = []
for module in ("megatron.core", "nemo", "pytest", "nemo.lightning", "nemo.collections.llm",
               "nvidia_resiliency_ext.ptl_resiliency.local_checkpoint_callback", "llm.train"):
    start = time.time()
    try:
        if module == "llm.train":  # resolved lazily by nemo.collections.llm: fails if llm.api's imports do
            importlib.import_module("nemo.collections.llm").train
        else:
            mod = importlib.import_module(module)
        print(f"install_wheels: import {module}: ok ({time.time() - start:.0f} s)"
              + (f", {mod.__version__}" if module in ("megatron.core", "nemo", "pytest") else ""))
    except Exception as exc:
        failed.append(module)
        last = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"install_wheels: import {module}: FAILED: {type(exc).__name__}: {str(exc)[:300]} "
              f"(at {last.filename}:{last.lineno})")
if failed:
    sys.exit(f"install_wheels: {len(failed)} import(s) failed: {', '.join(failed)}")
replace_file, target = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
names = [l.strip() for l in replace_file.read_text().splitlines() if l.strip() and not l.startswith("#")] \
    if replace_file.is_file() else []
for name in names:
    dist = md.distribution(name)
    where = Path(dist.locate_file("")).resolve()
    print(f"install_wheels: {name} {dist.version} from {where}")
    if where != target:
        sys.exit(f"install_wheels: {name} does not resolve to {target}")
EOF
}
