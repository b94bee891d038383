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
    stats: str = field(default="previous_step", metadata={"choices": ("previous_step", "micro_batch")})
    """DisCorD: where b and ḡ (global means over the batch) come from in training. previous_step:
    the previous optimizer step's, over its whole global batch (all micro-batches and data-parallel
    ranks), carried in checkpoints; a step's gradient then does not depend on how its batch is
    split, and the first step of a run has λ = 0. micro_batch: each micro-batch's own, reduced over
    data-parallel ranks (depends on the micro-batch size under gradient accumulation)."""
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
    """``nemo-dcod demo``: the whole pipeline on a synthetic reasoning task, on CPU, in minutes.

    A program teacher writes step-by-step solutions in two styles (:mod:`nemo_dcod.demo.task`),
    prepare filters and packs them, two students (SFT and DisCorD) train from one initialisation
    through the NeMo plug-in at TP=2, both are exported to Hugging Face and evaluated on held-out
    problems, and their exposure bias (ExAccErr) is measured against the teacher.
    """

    run_dir: str = "runs/demo"
    """Where every artifact of the run goes; a previous demo run there is replaced."""
    seed: int = 0
    """Seeds problems, teacher samples, initialisation, data order and the exposure samplers."""
    reduced: bool = False
    """CI mode: 300 training problems, 32 held-out ones, 8 steps, 16 exposure samples (checks that
    every stage runs and every artifact is consistent, not what the method does)."""
    num_ops: int = 3
    """Operations per problem (the shortcut style computes all of them in one token)."""
    modulus: int = 5
    """Arithmetic modulo this; digits 0..modulus-1 are the task's number words."""
    num_train_problems: int = 3000
    """Problems the teacher writes one trace each for (before the correctness filter)."""
    num_eval_problems: int = 200
    """Held-out problems (never in training) for accuracy and ExAccErr."""
    shortcut_prob: float = 0.65
    """Teacher: probability of the one-shot shortcut style (the student cannot execute it)."""
    step_error: float = 0.02
    """Teacher: probability that a stepwise line's result is wrong."""
    shortcut_error: float = 0.2
    """Teacher: probability that the shortcut's answer is wrong (the filter removes more of these)."""
    teacher_noise: float = 1e-3
    """Teacher: probability mass spread over every response word at each step (keeps KL finite)."""
    tensor_model_parallel_size: int = 2
    """TP of both students (one gloo process per rank on CPU)."""
    hidden_size: int = 64
    """Students' width (the tiny Llama 3.1: 4 layers, 4 heads of 16 channels). Width 128 (MLP 512)
    learned the task no faster in 400 steps (measured), and costs more per step."""
    ffn_hidden_size: int = 128
    """Students' MLP width."""
    seq_length: int = 128
    """Tokens per packed training row (a trace is ~25-35 tokens)."""
    global_batch_size: int = 16
    """Packed rows per optimizer step."""
    steps: int = 600
    """Optimizer steps of each student. Both start from the same seed (identical weights) and see
    the same batches; DisCorD's λ stays 0 for its `lambda_warmup_fraction` of them (the warm start
    it needs, FACTS.md), so the students' losses are equal step for step until then."""
    lr: float = 3e-3
    """Peak learning rate (linear warm-up, cosine decay to lr/10)."""
    exposure_samples: int = 200
    """Student and teacher prefixes sampled for ExAccErr (on held-out problems)."""
    losses: list[LossConfig] = field(
        default_factory=lambda: [
            LossConfig(name="sft"),
            LossConfig(name="discord", tau=1.0, lambda_warmup_fraction=0.4, lambda_ramp_fraction=0.2),
        ]
    )
    """The students, one per loss (names must differ), trained side by side from one initialisation."""

    def resolved(self) -> DemoConfig:
        """The sizes this run uses: these, or the CI sizes when ``reduced`` (see that field)."""
        if not self.reduced:
            return self
        return dataclasses.replace(
            self,
            num_train_problems=min(self.num_train_problems, 300),
            num_eval_problems=min(self.num_eval_problems, 32),
            steps=min(self.steps, 8),
            exposure_samples=min(self.exposure_samples, 16),
        )

    def problems(self) -> list[str]:
        out = choice_problems(self)
        for name in (
            "num_ops",
            "num_train_problems",
            "num_eval_problems",
            "tensor_model_parallel_size",
            "global_batch_size",
            "hidden_size",
            "ffn_hidden_size",
            "steps",
            "exposure_samples",
        ):
            if getattr(self, name) < 1:
                out.append(f"{name}={getattr(self, name)}: must be >= 1.")
        if self.modulus < 2:
            out.append(f"modulus={self.modulus}: must be >= 2.")
        if self.tensor_model_parallel_size not in (1, 2):
            out.append(
                f"tensor_model_parallel_size={self.tensor_model_parallel_size}: the tiny student has 4 "
                "attention heads in 2 query groups; TP must divide both (1 or 2)."
            )
        for name in ("shortcut_prob", "step_error", "shortcut_error"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"{name}={getattr(self, name)}: must be a probability in [0, 1].")
        if not 0 < self.teacher_noise < 1:
            out.append(f"teacher_noise={self.teacher_noise}: must be in (0, 1); 0 makes the KL infinite.")
        longest = 1 + 2 * self.num_ops + 8 + 6 * self.num_ops + 3  # prompt + stepwise response
        if self.seq_length < longest:
            out.append(
                f"seq_length={self.seq_length}: a num_ops={self.num_ops} trace takes up to {longest} "
                f"tokens; raise seq_length to at least that."
            )
        if self.lr <= 0:
            out.append(f"lr={self.lr}: must be > 0.")
        space = self.modulus * (2 * self.modulus) ** self.num_ops  # start x (operator, operand)^ops
        wanted = self.num_train_problems + self.num_eval_problems
        if self.modulus >= 2 and self.num_ops >= 1 and space < wanted:
            out.append(
                f"num_ops={self.num_ops}, modulus={self.modulus} give {space} distinct problems, fewer "
                f"than num_train_problems + num_eval_problems = {wanted}: raise num_ops or modulus, or "
                "ask for fewer."
            )
        if self.exposure_samples > self.num_eval_problems:
            out.append(
                f"exposure_samples={self.exposure_samples} > num_eval_problems={self.num_eval_problems}: "
                "prefixes are sampled on held-out problems, one each."
            )
        if not self.losses:
            out.append("losses: list at least one loss to train.")
        names = [loss.name for loss in self.losses]
        if len(set(names)) != len(names):
            out.append(f"losses: names {names} repeat; each student is named by its loss.")
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
