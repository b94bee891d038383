"""A loss added the way the README says, one module outside nemo_dcod, trains through `nemo-dcod train`.

The module lives in a temporary package on ``PYTHONPATH``; the loss section names it
(``module: ...``), nothing in nemo_dcod is touched. Its loss is twice SFT's, so its first logged
loss must be twice that of an SFT run from the same seed and data (the same initial weights): the
plug-in really ran it, with its own parameter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.paths import ROOT

pytestmark = [pytest.mark.distributed]

LOSS_MODULE = '''
"""``scaled_sft``: SFT times a constant (a test of the plug-in point)."""

from dataclasses import dataclass

from nemo_dcod.losses.registry import LossRequirements, register


@register("scaled_sft")
@dataclass(frozen=True)
class ScaledSFT:
    """ℓ_t = -scale · lq_t."""

    scale: float = 1.0
    """The constant."""
    requirements = LossRequirements()

    def problems(self) -> list[str]:
        return [] if self.scale > 0 else [f"scale={self.scale}: must be > 0."]

    def __call__(self, inputs, ctx):
        from nemo_dcod.losses.sft import SFTLoss

        loss_sum, tokens, metrics = SFTLoss()(inputs, ctx)
        return self.scale * loss_sum, tokens, metrics
'''


def _train(run_dir: Path, loss: str, env: dict[str, str]) -> float:
    args = [sys.executable, "-m", "nemo_dcod.cli", "train", "--config", str(ROOT / "conf/train_tiny.yaml")]
    args += [f"run_dir={run_dir}", "trainer.devices=1", "parallel.tensor_model_parallel_size=1"]
    args += [
        "trainer.max_steps=1",
        "optim.warmup_steps=0",
        "trainer.global_batch_size=2",
        "trainer.micro_batch_size=2",
        f"loss={loss}",
    ]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return float(records[0]["loss"])


def test_a_loss_in_its_own_module_trains_through_the_cli(tmp_path: Path) -> None:
    package = tmp_path / "my_losses"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scaled_sft.py").write_text(textwrap.dedent(LOSS_MODULE))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    custom = _train(tmp_path / "custom", "{name: scaled_sft, module: my_losses.scaled_sft, scale: 2.0}", env)
    sft = _train(tmp_path / "sft", "{name: sft}", env)
    assert custom == pytest.approx(2 * sft, rel=1e-6), (custom, sft)
    # Its own schema validates it, before anything is built: a bad value names the loss's field.
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "nemo_dcod.cli",
            "train",
            "loss={name: scaled_sft, module: my_losses.scaled_sft, scale: 0}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "loss.scale=0.0: must be > 0." in bad.stderr, bad.stderr
