"""Configs (every YAML in conf/ loads and validates), config errors, and the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.paths import ROOT

from nemo_dcod.cli import STAGES, main
from nemo_dcod.config import ConfigError, load_config
from nemo_dcod.data.config import PrepareConfig
from nemo_dcod.demo.config import DemoConfig
from nemo_dcod.eval.config import EvalConfig
from nemo_dcod.generate.config import GenerateConfig
from nemo_dcod.score.config import ScoreConfig
from nemo_dcod.study.config import StudyConfig
from nemo_dcod.train.config import TrainConfig

SCHEMAS: dict[str, type] = {
    "demo": DemoConfig,
    "train": TrainConfig,
    "prepare": PrepareConfig,
    "eval": EvalConfig,
    "score": ScoreConfig,
    "study": StudyConfig,
    "generate": GenerateConfig,
}


@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("**/*.yaml")), ids=lambda p: p.name)
def test_every_conf_yaml_starts_with_its_command_and_validates(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# nemo-dcod ") and f"--config conf/{path.relative_to(ROOT / 'conf')}" in first
    stage = first.split()[2]
    cfg = load_config(SCHEMAS[stage], path, check=False)
    # GPU recipes are checked as on the machine they are for; everything else must hold as well.
    if isinstance(cfg, TrainConfig):  # paths (a store) are made by other commands; GPU recipes as on one
        problems = cfg.problems(has_gpu=cfg.precision.dtype != "fp32" or None, check_paths=False)
    elif isinstance(cfg, ScoreConfig):  # the bf16 teacher recipe, as on a GPU node
        problems = cfg.problems(has_gpu=cfg.dtype == "bf16" or None)
    elif isinstance(cfg, GenerateConfig):  # the vLLM teacher recipe, as on a GPU node
        problems = cfg.problems(has_gpu=cfg.backend == "vllm" or None)
    else:
        problems = cfg.problems()
    assert problems == [], problems


def test_unknown_keys_and_bad_values_are_all_reported_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("# nemo-dcod demo --config bad.yaml\nsteps: 3\nstpes: 4\nlearning_rate: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(DemoConfig, cfg)
    assert len(err.value.problems) == 2
    assert "stpes: unknown key; valid keys here:" in str(err.value) and "learning_rate" in str(err.value)

    with pytest.raises(ConfigError) as err:
        load_config(
            DemoConfig,
            None,
            ["modulus=1", "students=[{name: discord, tau: -1, lambda_max: 2}, {name: gkd}]", "lr=0"],
        )
    text = str(err.value)
    assert len(err.value.problems) == 5, text
    for needle in (
        "modulus=1: must be >= 2",
        "students[0].tau=-1.0: must be > 0",
        "students[0].lambda_max=2.0: must be in [0, 1]",
        "students[1].name='gkd' is not a loss; known: sft, dft, iw_sft, kl, todi, discord",
        "lr=0.0: must be > 0",
    ):
        assert needle in text


def test_overrides_and_types(tmp_path: Path) -> None:
    cfg = load_config(DemoConfig, None, ["steps=7", "students=[{name: iw_sft, weight_max: 3}]"])
    assert cfg.steps == 7 and cfg.students == [{"name": "iw_sft", "weight_max": 3}]
    with pytest.raises(ConfigError, match="steps"):
        load_config(DemoConfig, None, ["steps=many"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(DemoConfig, None, ["steps"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(DemoConfig, tmp_path / "missing.yaml")


def test_loss_sections_are_replaced_when_the_loss_changes() -> None:
    """`loss.name=sft` over a DisCorD section: SFT with its own (no) parameters, not DisCorD's."""
    cfg = load_config(TrainConfig, ROOT / "conf" / "train_tiny.yaml", ["loss.name=sft"])
    assert cfg.loss == {"name": "sft"}
    kept = load_config(TrainConfig, ROOT / "conf" / "train_tiny.yaml", ["loss.tau=2.0"])
    assert kept.loss["name"] == "discord" and kept.loss["tau"] == 2.0 and "lambda_max" in kept.loss
    with pytest.raises(ConfigError) as err:  # a parameter of another loss, said so
        load_config(TrainConfig, None, ["loss={name: sft, tau: 1.0}"])
    assert "loss.tau: not a parameter of loss 'sft'; it is a parameter of discord" in str(err.value)


def test_cli_help_lists_stages(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for stage, (help_, _) in STAGES.items():
        assert f"  {stage:<9} {help_}" in out, stage
    assert main(["score"]) == 2  # no checkpoint given: a config error, before anything is loaded
    assert "checkpoint: set the NeMo 2 checkpoint" in capsys.readouterr().err
    assert main(["demo", "steps=-1"]) == 2
    assert "steps=-1" in capsys.readouterr().err


def test_train_config_errors_all_reported_before_anything_is_built(tmp_path: Path) -> None:
    """Sizes that do not divide, PP > layers, FP8 on CPU, unknown keys, a bad type, a loss
    hyper-parameter out of range and a seed NeMo would refuse: one error listing all, and NeMo is
    never imported (no model)."""
    bad = [
        "parallel.tensor_model_parallel_size=3",
        "parallel.pipeline_model_parallel_size=8",
        "precision.fp8=e4m3",
        "trainer.stpes=3",
        "trainer.max_steps=abc",
        "loss.tau=-1",
        "seed=0",
        f"run_dir={tmp_path / 'run'}",
    ]
    code = (
        "import sys; from nemo_dcod.cli import main; rc = main(sys.argv[1:]); "
        "print('NEMO_IMPORTED' if 'nemo.lightning' in sys.modules else 'NEMO_NOT_IMPORTED'); sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", "--config", str(ROOT / "conf/train_tiny.yaml"), *bad],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "NEMO_NOT_IMPORTED" in proc.stdout
    expected = [
        "8 problem(s)",
        "seed=0: must be >= 1",
        "trainer.stpes: unknown key",
        "trainer.max_steps: Value 'abc'",
        "loss.tau=-1.0: must be > 0",
        "is not divisible by TP x PP x CP = 24",
        "parallel.pipeline_model_parallel_size=8 > model layers (4)",
        "parallel.tensor_model_parallel_size=3 must divide the attention heads",
        "precision.fp8=e4m3: FP8 needs a GPU",
    ]
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_help_documents_every_key_without_torch_or_nemo(stage: str) -> None:
    """`nemo-dcod <stage> --help`: every config key (nested ones dotted) with its docstring, fast."""
    import dataclasses
    import time

    from nemo_dcod.cli import _STAGE_SPECS, _resolve
    from nemo_dcod.help import field_docs

    code = (
        "import sys; from nemo_dcod.cli import main; rc = main(sys.argv[1:]); "
        "print('HEAVY' if {'torch', 'nemo'} & set(sys.modules) else 'LIGHT'); sys.exit(rc)"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, stage, "--help"], capture_output=True, text=True, timeout=60
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("LIGHT"), "help imported torch or NeMo"
    assert elapsed < 5, elapsed  # well under a second of work; the interpreter's start included

    def keys(cls: type, prefix: str = "") -> list[tuple[str, str]]:
        out, docs = [], field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                out += keys(type(default), f"{prefix}{f.name}.")
            else:
                out.append((f"{prefix}{f.name}", docs[f.name]))  # every field has a docstring
        return out

    for key, doc in keys(_resolve(_STAGE_SPECS[stage][1])):
        assert f"  {key}: " in proc.stdout, key
        assert doc.split()[0] in proc.stdout, (key, doc)
    losses = {"train": "loss.tau: float = 1.0", "demo": "students[i].tau: float = 1.0"}
    if stage in losses:
        assert "name: discord" in proc.stdout and losses[stage] in proc.stdout
