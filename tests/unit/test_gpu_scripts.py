"""The GPU check's scripts, where they run without a GPU: the step plan against the budget, and
``install_wheels`` (scripts/gpu_install.sh, the function gpu_check.sh and gpu_sim.sh share) on
this venv with a small wheel set made here (missing, replacing and already-present wheels)."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers.paths import ROOT


def _plan(seconds: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPU_CHECK_SECONDS": str(seconds)}
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--plan"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_step_limits_fit_the_budget_and_an_overrun_is_refused() -> None:
    ok = _plan(570)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    line = ok.stdout.strip()
    # "gpu_check plan: install:110 ... reserve:15 = 570 s of a 570 s budget", training first.
    entries = line.split(": ", 1)[1].split(" = ")[0].split()
    names = [e.split(":")[0] for e in entries]
    total = sum(int(e.split(":")[1]) for e in entries)
    assert names[:3] == ["install", "data", "train_1b"] and names.index("pytest_gpu") < names.index("score")
    assert total <= 570 and f"= {total} s of a 570 s budget" in line
    short = _plan(total - 1)
    assert short.returncode == 2 and "exceed the budget" in short.stdout


def _wheel(where: Path, name: str, version: str, module: str) -> Path:
    """A pure-Python wheel of one module that records its version."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{module}.py": f"__version__ = {version!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    rows = []
    path = where / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for arc, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{arc},sha256={digest},{len(data)}")
            zf.writestr(arc, data)
        zf.writestr(f"{dist_info}/RECORD", "\n".join([*rows, f"{dist_info}/RECORD,,"]) + "\n")
    return path


@pytest.mark.slow
def test_install_wheels_adds_missing_replaces_listed_and_keeps_the_rest(tmp_path: Path) -> None:
    """Into a target dir (first on PYTHONPATH): the missing wheel is installed, toml (installed
    here, 0.10.2) is replaced because replace.txt names it, omegaconf (installed here) is kept;
    then the import check (megatron.core, nemo.lightning, llm.train, the resiliency callback) and
    the replacement resolving to the target. Without the replacement's wheel it fails."""
    wheels, built = tmp_path / "wheels", tmp_path / "built"
    wheels.mkdir()
    built.mkdir()
    _wheel(built, "dcod_probe_missing", "1.0", "dcod_probe_missing")
    _wheel(built, "toml", "99.0", "toml")
    _wheel(built, "omegaconf", "0.0.1", "omegaconf")
    with tarfile.open(wheels / "wheels.tar.xz", "w:xz") as tar:
        for whl in built.iterdir():
            tar.add(whl, arcname=whl.name)
    (wheels / "replace.txt").write_text("toml\n")
    target = tmp_path / "site"
    script = f'source {ROOT}/scripts/gpu_install.sh && install_wheels "$1" "$2" "$3"'
    cmd = ["bash", "-c", script, "install", sys.executable, str(wheels), str(target)]
    env = {**os.environ, "PYTHONPATH": f"{target}:{ROOT}", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "install_wheels: replacing toml 0.10.2 -> 99.0" in out
    assert "kept: omegaconf 2.3.0 (carried 0.0.1)" in out
    assert "installing 2 of 3 carried wheels" in out
    assert "install_wheels: import llm.train: ok" in out
    assert f"install_wheels: toml 99.0 from {target.resolve()}" in out
    assert (target / "dcod_probe_missing.py").is_file() and not (target / "omegaconf.py").exists()

    # replace.txt naming a distribution with no carried wheel is an error, before any install.
    (wheels / "replace.txt").write_text("toml\nlightning\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0
    assert "replace.txt names ['lightning'] but no such wheel is carried" in proc.stdout
