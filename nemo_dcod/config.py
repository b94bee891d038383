"""Configuration: dataclasses are the schema, YAML gives values, ``key=value`` overrides the CLI.

    cfg = load_config(DemoConfig, "conf/demo.yaml", ["loss.tau=2.0", "steps=50"])

Unknown keys are errors (with the valid ones listed); values are type-checked by OmegaConf
against the dataclass; after merging, :func:`validate` walks the whole tree, collects every
problem, and raises once with all of them, naming each field the way it is written on the command
line. Each field's docstring (the string literal below it) is what ``--help`` would print.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_dcod.losses import LambdaSchedule, LossName, TokenLoss, build_loss
from nemo_dcod.losses.weights import Variant

__all__ = ["ConfigError", "DemoConfig", "LossConfig", "load_config", "to_yaml", "validate"]


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""

    def __init__(self, problems: Sequence[str], source: str = "config") -> None:
        self.problems = list(problems)
        super().__init__(
            f"{source}: {len(self.problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        )


def choice_problems(cfg: Any, prefix: str = "") -> list[str]:
    """Fields declared with ``metadata={"choices": (...)}`` whose value is not one of them.

    OmegaConf cannot type-check ``Literal``; the choices live in the field's metadata instead.
    """
    out = []
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices is not None and value not in choices:
            key = f"{prefix}.{f.name}" if prefix else f.name
            out.append(f"{key}={value!r}: must be one of {', '.join(map(str, choices))}.")
    return out


@dataclass
class LossConfig:
    """Which loss trains the student, and its hyper-parameters (DESIGN.md §1)."""

    name: str = field(default="discord", metadata={"choices": get_args(LossName)})
    """discord | sft | dft | iw_sft | kl | todi."""
    variant: str = field(default="token", metadata={"choices": get_args(Variant)})
    """DisCorD: Δ per token, over a causal prefix window, or one per trace."""
    base: str = field(default="ce", metadata={"choices": ("ce", "kl")})
    """DisCorD: the weighted per-token loss, cross-entropy or top-k forward KL."""
    tau: float = 1.0
    """DisCorD: sigmoid temperature τ > 0. The probe in FACTS.md found τ = 0.5 unstable at λ = 1."""
    center: bool = False
    """DisCorD: centre Δ by its global masked mean (b) instead of b = 0."""
    clip: float = 10.0
    """DisCorD: Δ is clipped to [-clip, clip]."""
    window: int = 16
    """DisCorD prefix variant: window W in tokens."""
    lambda_max: float = 1.0
    """DisCorD: final λ in [0, 1]; 0 is SFT."""
    lambda_warmup_fraction: float = 0.0
    """DisCorD: fraction of steps with λ = 0."""
    lambda_ramp_fraction: float = 0.0
    """DisCorD: fraction of steps of the linear ramp to lambda_max after the warm-up."""
    iw_weight_min: float = 0.0
    """iw_sft: lower clip of the sequence weight."""
    iw_weight_max: float = 2.0
    """iw_sft: upper clip of the sequence weight."""
    todi_beta: float = 1.0
    """todi: sharpness of the per-entry sigmoid gate."""
    chunk_size: int | None = None
    """Rows (tokens) per chunk of the vocab-parallel log-prob op; null: no chunking (fastest)."""
    validate: bool = True
    """Check loss inputs every micro-batch (finite, in range); one device sync each."""

    def problems(self, prefix: str = "loss") -> list[str]:
        out = choice_problems(self, prefix)
        if self.tau <= 0:
            out.append(f"{prefix}.tau={self.tau}: must be > 0.")
        if self.clip <= 0:
            out.append(f"{prefix}.clip={self.clip}: must be > 0.")
        if self.window < 1:
            out.append(f"{prefix}.window={self.window}: must be >= 1 token.")
        if not 0 <= self.lambda_max <= 1:
            out.append(f"{prefix}.lambda_max={self.lambda_max}: must be in [0, 1].")
        if not 0 <= self.lambda_warmup_fraction < 1:
            out.append(f"{prefix}.lambda_warmup_fraction={self.lambda_warmup_fraction}: must be in [0, 1).")
        if not 0 <= self.lambda_ramp_fraction <= 1:
            out.append(f"{prefix}.lambda_ramp_fraction={self.lambda_ramp_fraction}: must be in [0, 1].")
        if self.lambda_warmup_fraction + self.lambda_ramp_fraction > 1:
            out.append(
                f"{prefix}.lambda_warmup_fraction + {prefix}.lambda_ramp_fraction = "
                f"{self.lambda_warmup_fraction + self.lambda_ramp_fraction}: must be <= 1."
            )
        if not 0 <= self.iw_weight_min < self.iw_weight_max:
            out.append(
                f"{prefix}.iw_weight_min={self.iw_weight_min}, {prefix}.iw_weight_max={self.iw_weight_max}: "
                "need 0 <= min < max."
            )
        if self.todi_beta <= 0:
            out.append(f"{prefix}.todi_beta={self.todi_beta}: must be > 0.")
        if self.chunk_size is not None and self.chunk_size < 1:
            out.append(f"{prefix}.chunk_size={self.chunk_size}: must be >= 1, or null for no chunking.")
        return out

    def needs_topk(self) -> bool:
        """Whether this loss reads the stored teacher top-k."""
        return self.name in ("kl", "todi") or (self.name == "discord" and self.base == "kl")

    def build(self) -> TokenLoss:
        """The configured loss object."""
        if self.name == "discord":
            schedule = LambdaSchedule(self.lambda_max, self.lambda_warmup_fraction, self.lambda_ramp_fraction)
            return build_loss(
                "discord",
                variant=self.variant,
                base=self.base,
                tau=self.tau,
                center=self.center,
                clip=self.clip,
                window=self.window,
                schedule=schedule,
            )
        if self.name == "iw_sft":
            return build_loss("iw_sft", weight_min=self.iw_weight_min, weight_max=self.iw_weight_max)
        if self.name == "todi":
            return build_loss("todi", beta=self.todi_beta)
        return build_loss(self.name)


@dataclass
class DemoConfig:
    """The embedded default: SFT vs DisCorD on a synthetic stochastic teacher, tensor-parallel."""

    run_dir: str = "runs/demo"
    """Where every artifact of the run goes."""
    seed: int = 0
    """Seeds data, initialisation and sampling."""
    tensor_model_parallel_size: int = 2
    """Ranks the student's output layer is split over (gloo processes on CPU)."""
    vocab_size: int = 48
    """The synthetic task's vocabulary (a Markov teacher over these tokens)."""
    seq_length: int = 24
    """Tokens per trace."""
    num_traces: int = 512
    """Teacher traces to train on."""
    micro_batch_size: int = 32
    """Traces per step."""
    steps: int = 150
    """Optimizer steps per student."""
    lr: float = 0.05
    """Adam learning rate."""
    warmup_steps: int = 30
    """SFT steps that warm both students up before they diverge (DFT/DisCorD need a warm start)."""
    topk: int = 4
    """Teacher top-k stored with the traces (for the kl/todi bases)."""
    losses: list[LossConfig] = field(
        default_factory=lambda: [LossConfig(name="sft"), LossConfig(name="discord", tau=1.0)]
    )
    """The students to train, one per loss."""

    def problems(self) -> list[str]:
        out = choice_problems(self)
        for name in (
            "vocab_size",
            "seq_length",
            "num_traces",
            "micro_batch_size",
            "tensor_model_parallel_size",
        ):
            if getattr(self, name) < 1:
                out.append(f"{name}={getattr(self, name)}: must be >= 1.")
        if self.steps < 0 or self.warmup_steps < 0:
            out.append(f"steps={self.steps}, warmup_steps={self.warmup_steps}: must be >= 0.")
        if self.vocab_size % max(self.tensor_model_parallel_size, 1):
            out.append(
                f"vocab_size={self.vocab_size} is not divisible by tensor_model_parallel_size="
                f"{self.tensor_model_parallel_size}: pick sizes that divide."
            )
        if not 0 < self.topk < self.vocab_size:
            out.append(f"topk={self.topk}: must be in [1, vocab_size).")
        if self.lr <= 0:
            out.append(f"lr={self.lr}: must be > 0.")
        if not self.losses:
            out.append("losses: list at least one loss to train.")
        for i, loss in enumerate(self.losses):
            out.extend(loss.problems(prefix=f"losses[{i}]"))
        return out


C = TypeVar("C")


def validate(cfg: Any, source: str = "config") -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg`` (and of nested configs)."""
    problems = cfg.problems() if hasattr(cfg, "problems") else []
    if problems:
        raise ConfigError(problems, source)


def load_config(
    schema: type[C], path: str | Path | None = None, overrides: Sequence[str] = (), check: bool = True
) -> C:
    """Schema defaults <- YAML file <- ``key=value`` overrides, type-checked, then validated.

    ``check=False`` stops after type-checking (to check a GPU recipe on a CPU machine, say).

    Raises:
        ConfigError: unknown keys, wrong types, malformed overrides, or invalid values; all at once
            where they can be collected.
    """
    source = str(path) if path else schema.__name__
    base = OmegaConf.structured(schema)
    layers = []
    problems: list[str] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"{p}: no such file (configs live in conf/)."], source)
        try:
            layers.append(OmegaConf.load(p))
        except Exception as exc:  # YAML syntax errors come in several types
            raise ConfigError([f"{p}: not valid YAML: {exc}"], source) from exc
    bad = [o for o in overrides if "=" not in o]
    problems.extend(f"override {o!r}: expected key=value" for o in bad)
    good = [o for o in overrides if "=" in o]
    if good:
        try:
            layers.append(OmegaConf.from_dotlist(list(good)))
        except OmegaConfBaseException as exc:
            problems.append(f"overrides: {exc}")
    for layer in layers:
        problems.extend(_unknown_keys(base, layer, schema, drop=True))
    # Merge what is left; a value of the wrong type is reported, dropped, and the merge retried,
    # so that one run reports every problem (unknown keys, types, then values) at once.
    merged = None
    for _ in range(64):
        try:
            merged = OmegaConf.merge(base, *layers)
            break
        except OmegaConfBaseException as exc:
            problems.append(_omegaconf_message(exc))
            if not _drop(layers, getattr(exc, "full_key", None)):
                break
    if merged is None:
        raise ConfigError(problems, source)
    cfg: Any = OmegaConf.to_object(merged)
    if check and hasattr(cfg, "problems"):
        problems.extend(cfg.problems())
    if problems:
        raise ConfigError(problems, source)
    result: C = cfg
    return result


def _drop(layers: list[Any], key: str | None) -> bool:
    """Remove dotted ``key`` from every layer holding it; False if it cannot be found."""
    if not key:
        return False
    found = False
    for layer in layers:
        node = layer
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.get(part) if OmegaConf.is_dict(node) else None
        if OmegaConf.is_dict(node) and parts[-1] in node:
            del node[parts[-1]]
            found = True
    return found


def _unknown_keys(base: Any, layer: Any, schema: type, prefix: str = "", drop: bool = False) -> list[str]:
    out: list[str] = []
    if not OmegaConf.is_dict(layer):
        return out
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    unknown: list[Any] = []
    for key in layer:
        full = f"{prefix}{key}"
        if key not in fields:
            out.append(f"{full}: unknown key; valid keys here: {', '.join(sorted(fields))}.")
            unknown.append(key)
            continue
        sub = getattr(base, str(key), None)
        if OmegaConf.is_dict(sub) and OmegaConf.is_dict(layer[key]):
            sub_schema = OmegaConf.get_type(sub)
            if sub_schema is not None:
                out.extend(_unknown_keys(sub, layer[key], sub_schema, prefix=f"{full}.", drop=drop))
    if drop:
        for key in unknown:
            del layer[key]
    return out


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def to_yaml(cfg: Any) -> str:
    """The resolved configuration as YAML (what rank 0 writes into the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
