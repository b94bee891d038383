"""The numpy-2 shim for megatron-core 0.15.3's ``np.product`` (nemo_dcod/parallel/numpy_compat.py).

Our venv has numpy 1 (megatron-core pins ``numpy<2``), which still has ``np.product``; the GPU
image has numpy 2, which does not. Here numpy 2 is stood in for by deleting the attribute; the
probe under the image's real numpy 2 runs in scripts/gpu_sim.sh (tests/distributed/test_gpu_sim.py).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers.paths import ROOT

from nemo_dcod.parallel.numpy_compat import restore_np_product

PROBE = ROOT / "tests" / "helpers" / "np_product_probe.py"


def test_restore_defines_product_only_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    original = np.product
    assert restore_np_product() is False
    assert np.product is original  # an existing np.product is left alone
    monkeypatch.delattr(np, "product")
    assert not hasattr(np, "product")
    assert restore_np_product() is True
    assert np.product is np.prod
    assert restore_np_product() is False


@pytest.mark.parametrize(("shim", "ok"), [(True, True), (False, False)], ids=["shim", "no_shim"])
def test_megatron_np_product_sites(shim: bool, ok: bool) -> None:
    """megatron-core's three np.product sites without np.product: right numbers with the shim
    (imported with nemo_dcod), AttributeError without it (the failure the shim prevents)."""
    args = [sys.executable, str(PROBE), "--drop", *([] if shim else ["--no-shim"])]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=180, cwd=ROOT)
    out = proc.stdout + proc.stderr
    if ok:
        assert proc.returncode == 0, out
        assert "np_product_probe: ok" in out
        assert "exchange_utils._shard_size: 96" in out
    else:
        assert proc.returncode == 1, out
        assert "FAILED: AttributeError: module 'numpy' has no attribute 'product'" in out
