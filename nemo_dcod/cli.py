"""``nemo-dcod <stage> [--config conf/....yaml] [key=value ...]``: parse, load config, call a stage.

No logic lives here: each stage is a function of a validated config. A few stages also take
flags (``nemo-dcod import --hf DIR --out DIR``); each flag is a shorthand for one config key of
that stage (:data:`FLAGS`) and is turned into a ``key=value`` override before the explicit ones.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

# torch imports the deprecated `pynvml` shim on every start; the warning is noise for our users.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated")
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # the same, in spawned ranks

from nemo_dcod.config import ConfigError, load_config  # noqa: E402

_CONVERT_ERRORS = (
    "nemo_dcod.convert.hf_import:InputError",
    "nemo_dcod.convert.coverage:ConversionError",
    "nemo_dcod.convert.verify:VerificationError",
    "builtins:FileExistsError",
)

# stage -> (help, config schema, stage function, user errors: "module:name" each, imported on use).
# A user error prints one line and exits 1; a ConfigError exits 2 (see main).
_STAGE_SPECS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "demo": (
        "the embedded default: teacher -> prepare -> train SFT and DisCorD (TP=2) -> export -> eval",
        "nemo_dcod.demo.config:DemoConfig",
        "nemo_dcod.study.demo:run_demo",
        ("nemo_dcod.study.demo:DemoError",),
    ),
    "study": (
        "labelled students x seeds through prepare -> train -> export -> eval, compared over seeds",
        "nemo_dcod.study.config:StudyConfig",
        "nemo_dcod.study.run:run_study",
        ("nemo_dcod.study.config:StudyError",),
    ),
    "train": (
        "the student with DisCorD (or a baseline) through the NeMo plug-in",
        "nemo_dcod.train.config:TrainConfig",
        "nemo_dcod.train.run:run_train",
        ("nemo_dcod.data.readers:DataError",),  # the store: incomplete, or a bad value in a row
    ),
    "eval": (
        "math benchmarks (GSM8K, MATH, MATH500, AMC, AIME, OlympiadBench) on a Hugging Face model",
        "nemo_dcod.eval.config:EvalConfig",
        "nemo_dcod.eval.run:run_eval",
        ("nemo_dcod.eval.config:EvalError", "builtins:ImportError"),
    ),
    "generate": (
        "problems x a teacher (transformers or vLLM) -> graded traces with its per-token log-probs",
        "nemo_dcod.generate.config:GenerateConfig",
        "nemo_dcod.generate.run:run_generate",
        ("nemo_dcod.generate.config:GenerateError",),
    ),
    "prepare": (
        "traces (JSONL, Parquet, saved HF dataset) -> packed, sharded sample store",
        "nemo_dcod.data.config:PrepareConfig",
        "nemo_dcod.data.prepare:run_prepare",
        ("nemo_dcod.data.readers:DataError",),
    ),
    "score": (
        "a NeMo 2 checkpoint, forward only at any TP/PP/DP -> teacher log-probs (and top-k) into the store",
        "nemo_dcod.score.config:ScoreConfig",
        "nemo_dcod.score.run:run_score",
        ("nemo_dcod.data.readers:DataError",),
    ),
    "import": (
        "a Hugging Face checkpoint -> NeMo 2 (--hf DIR --out DIR), verified",
        "nemo_dcod.convert.config:ImportConfig",
        "nemo_dcod.convert.hf_import:run_import",
        _CONVERT_ERRORS,
    ),
    "export": (
        "a NeMo 2 checkpoint -> Hugging Face (--checkpoint DIR --hf-out DIR), verified",
        "nemo_dcod.convert.config:ExportConfig",
        "nemo_dcod.convert.hf_export:run_export",
        _CONVERT_ERRORS,
    ),
}


# stage -> its dry run: validate as on the job's machine, print the layout and the per-GPU memory
# estimate, run nothing (before asking a cluster for GPUs).
DRY_RUNS: dict[str, str] = {
    "prepare": "nemo_dcod.data.dry_run:dry_run_prepare",
    "score": "nemo_dcod.score.dry_run:dry_run_score",
    "train": "nemo_dcod.train.dry_run:dry_run_train",
    "generate": "nemo_dcod.generate.plan:dry_run_generate",
}
# Dry-run options -> the dry runs that take them.
_DRY_RUN_OPTIONS: dict[str, tuple[str, ...]] = {
    "store_plan": ("prepare", "score", "train"),
    "made_later": ("prepare", "score", "train"),
}


def _resolve(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _stage(name: str) -> Callable[..., int]:
    _, schema, run, errors = _STAGE_SPECS[name]

    def call(config: str | None, overrides: Sequence[str], dry_run: bool = False, **options: Any) -> int:
        given = {k: v for k, v in options.items() if v not in (None, False)}
        wrong = [k for k in given if not dry_run or name not in _DRY_RUN_OPTIONS[k]]
        if wrong:
            flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
            raise ConfigError(
                [f"{flags}: options of the dry runs of {', '.join(DRY_RUNS)} only."], "command line"
            )
        if dry_run:
            if name not in DRY_RUNS:
                raise ConfigError([f"--dry-run: only for {', '.join(DRY_RUNS)}."], "command line")
            unchecked = load_config(_resolve(schema), config, overrides, check=False)  # the dry run checks
            try:
                return int(_resolve(DRY_RUNS[name])(unchecked, **given))
            except tuple(_resolve(e) for e in errors) as exc:
                print(f"nemo-dcod {name} --dry-run: {exc}", file=sys.stderr)
                return 1
        cfg = load_config(_resolve(schema), config, overrides)
        try:
            _resolve(run)(cfg)
        except tuple(_resolve(e) for e in errors) as exc:
            print(f"nemo-dcod {name}: {exc}", file=sys.stderr)
            return 1
        return 0

    return call


STAGES: dict[str, tuple[str, Callable[..., int]]] = {
    name: (spec[0], _stage(name)) for name, spec in _STAGE_SPECS.items()
}

# --flag -> (stages that take it, config key). Booleans are --flag / --no-flag.
FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "hf": (("import",), "hf"),
    "out": (("import",), "out"),
    "checkpoint": (("export",), "checkpoint"),
    "hf_out": (("export",), "hf_out"),
    "nemo_out": (("export",), "nemo_out"),
    "tokenizer": (("export",), "tokenizer"),
    "overwrite": (("import", "export"), "overwrite"),
    "verify": (("import", "export"), "verify.enabled"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-dcod",
        description="Distribution-corrected offline distillation (DisCorD) for NeMo 2 / Megatron-core.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages:\n" + "\n".join(f"  {name:<9} {help_}" for name, (help_, _) in STAGES.items()),
    )
    parser.add_argument("stage", choices=list(STAGES), metavar="stage", help="the stage to run (see below)")
    parser.add_argument("--config", help="YAML config (conf/...); default: the stage's built-in defaults")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.tau=2.0 steps=50")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=f"{'/'.join(DRY_RUNS)}: apply every check the run applies at start, as on the machine it is "
        "for; print the parallel layout and the per-GPU memory estimate; run nothing",
    )
    parser.add_argument(
        "--store-plan",
        metavar="FILE",
        help="dry runs: check against this store plan when the store does not exist yet; prepare and "
        "score write (update) it with what they will make",
    )
    parser.add_argument(
        "--made-later",
        action="store_true",
        help="dry runs: what an earlier job of the chain makes (prepare: the trace files; score: the "
        "checkpoint; train: model.init_from) is not there yet: the checks that read it run in the job",
    )
    flags = parser.add_argument_group("import / export flags (shorthands for config keys)")
    for name, (stages, key) in FLAGS.items():
        option = "--" + name.replace("_", "-")
        where = "/".join(stages)
        if name in ("overwrite", "verify"):
            flags.add_argument(
                option, action=argparse.BooleanOptionalAction, default=None, help=f"{where}: {key}=true|false"
            )
        else:
            flags.add_argument(option, metavar="DIR", help=f"{where}: {key}=DIR")
    return parser


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The stage's flags as ``key=value`` overrides.

    Raises:
        ConfigError: a flag given to a stage that does not take it.
    """
    out, problems = [], []
    for name, (stages, key) in FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        option = "--" + name.replace("_", "-")
        if args.stage not in stages:
            problems.append(f"{option}: a flag of `nemo-dcod {' / '.join(stages)}`, not of `{args.stage}`.")
        elif isinstance(value, bool):
            out.append(f"{key}={str(value).lower()}")
        else:
            out.append(f"{key}={value}")
    if problems:
        raise ConfigError(problems, "command line")
    return out


def stage_help(stage: str) -> str:
    """``nemo-dcod <stage> --help``: the stage's keys from its schema (no torch or NeMo import)."""
    from nemo_dcod.help import stage_help as describe

    summary, schema, _, _ = _STAGE_SPECS[stage]
    text = describe(stage, _resolve(schema), summary)
    flags = [f"--{n.replace('_', '-')} ({key})" for n, (stages, key) in FLAGS.items() if stage in stages]
    if flags:
        text += "\nflags (shorthands for keys): " + ", ".join(flags) + "\n"
    if stage in DRY_RUNS:
        text += (
            "\n--dry-run: apply every check the run applies at start, print the layout and memory estimate.\n"
        )
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _STAGE_SPECS and any(a in ("-h", "--help") for a in argv[1:]):
        print(stage_help(argv[0]), end="")
        return 0
    args = build_parser().parse_intermixed_args(argv)
    try:
        overrides = [*flag_overrides(args), *args.overrides]
        return STAGES[args.stage][1](
            args.config,
            overrides,
            dry_run=args.dry_run,
            store_plan=args.store_plan,
            made_later=args.made_later,
        )
    except ConfigError as exc:
        print(f"nemo-dcod {args.stage}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
