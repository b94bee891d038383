"""``nemo-dcod <stage> [--config conf/....yaml] [key=value ...]``: parse, load config, call a stage.

No logic lives here: each stage is a function of a validated config.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence

# torch imports the deprecated `pynvml` shim on every start; the warning is noise for our users.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated")
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # the same, in spawned ranks

from nemo_dcod.config import ConfigError, DemoConfig, load_config  # noqa: E402

# Stages that later work items add; until then they say so and exit non-zero.
PENDING = {
    "prepare": "traces -> packed sample store",
    "score": "teacher log-probs (and top-k) into the store",
    "import": "a Hugging Face checkpoint -> NeMo 2",
    "export": "a trained checkpoint -> Hugging Face and NeMo 2",
    "eval": "math benchmarks on an exported model",
}


def _demo(config: str | None, overrides: Sequence[str]) -> int:
    from nemo_dcod.demo import run_demo

    run_demo(load_config(DemoConfig, config, overrides))
    return 0


def _train(config: str | None, overrides: Sequence[str]) -> int:
    from nemo_dcod.train.config import TrainConfig
    from nemo_dcod.train.run import run_train

    run_train(load_config(TrainConfig, config, overrides))
    return 0


STAGES: dict[str, tuple[str, Callable[[str | None, Sequence[str]], int]]] = {
    "demo": ("the embedded default: SFT vs DisCorD on a synthetic teacher, CPU, tensor-parallel", _demo),
    "train": ("the student with DisCorD (or a baseline) through the NeMo plug-in", _train),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-dcod",
        description="Distribution-corrected offline distillation (DisCorD) for NeMo 2 / Megatron-core.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages:\n"
        + "\n".join(f"  {name:<9} {help_}" for name, (help_, _) in STAGES.items())
        + "\n"
        + "\n".join(f"  {name:<9} {help_} (not available yet)" for name, help_ in PENDING.items()),
    )
    parser.add_argument(
        "stage", choices=[*STAGES, *PENDING], metavar="stage", help="the stage to run (see below)"
    )
    parser.add_argument("--config", help="YAML config (conf/...); default: the stage's built-in defaults")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.tau=2.0 steps=50")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.stage in PENDING:
        print(f"nemo-dcod {args.stage}: not implemented yet ({PENDING[args.stage]}).", file=sys.stderr)
        return 2
    try:
        return STAGES[args.stage][1](args.config, args.overrides)
    except ConfigError as exc:
        print(f"nemo-dcod {args.stage}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
