"""The Slurm scripts and Lightning's Slurm environment without a cluster (``tests/slurm`` runs them
on a real one): the scripts parse (``bash -n``) and pass shellcheck; under srun's variables
Lightning takes its ranks from Slurm, without its own auto-requeue."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.paths import ROOT

SCRIPTS = ("launchers/slurm.sh", "slurm/distill_tiny_local.sh", "slurm/distill_70b_to_8b.sh")


def test_scripts_parse_and_pass_shellcheck() -> None:
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck); bash -n passed")
    proc = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_lightning_auto_requeue_is_off_under_srun(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Under srun Lightning picks its Slurm environment, without its own SIGUSR1 requeue handler."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from nemo_dcod.config import load_config
    from nemo_dcod.train.callbacks import PreemptOnSigusr1
    from nemo_dcod.train.config import TrainConfig
    from nemo_dcod.train.run import _trainer

    slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_JOB_ID": "7"}
    slurm |= {"SLURM_JOB_NAME": "dcod", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1"}
    for key, value in {**slurm, "SLURM_NODELIST": "node[1-2]"}.items():
        monkeypatch.setenv(key, value)
    for key in ("MASTER_ADDR", "MASTER_PORT"):  # unset now; whatever Lightning sets is undone after
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    cfg = load_config(
        TrainConfig, ROOT / "conf/train_tiny.yaml", ["trainer.devices=1", "trainer.num_nodes=2"]
    )
    trainer = _trainer(cfg, tmp_path)
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and not environment.auto_requeue
    assert (environment.global_rank(), environment.node_rank(), environment.world_size()) == (1, 1, 2)
    assert (environment.main_address, environment.main_port) == ("node1", 15007)  # the launcher's rule too
    assert any(isinstance(c, PreemptOnSigusr1) for c in trainer.callbacks)
