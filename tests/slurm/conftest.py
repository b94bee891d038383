"""The session's Slurm cluster: installed if missing (root + apt-get), started once, stopped at the end."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.paths import ROOT
from helpers.slurm_cluster import ClusterUnavailable, LocalSlurm, ensure_installed


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurm]:
    """slurmctld and four slurmd (node1..node4) on this machine; see tests/helpers/slurm_cluster.py."""
    try:
        ensure_installed()
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    # Not under pytest's tmp dirs: those are private to root, and munged runs as the munge user.
    base = Path(tempfile.mkdtemp(prefix="nemo_dcod_slurm_", dir="/tmp"))
    cluster = LocalSlurm(base, cwd=ROOT)
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"cannot start a local Slurm cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
