"""``nemo-dcod demo``'s schema: the embedded default, every field with its docstring."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from nemo_dcod.config import LOSS_SECTION, choice_problems
from nemo_dcod.losses.registry import label_of, loss_problems

__all__ = ["DemoConfig", "student_problems"]


def student_problems(students: list[dict[str, Any]], prefix: str = "students") -> list[str]:
    """Problems of a list of labelled loss sections: none, repeated labels, each section's own."""
    if not students:
        return [f"{prefix}: list at least one student (a loss section, e.g. {{name: sft}})."]
    out = []
    labels = [label_of(s) for s in students]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        out.append(
            f"{prefix}: labels {repeated} repeat; give each student its own `label` (e.g. "
            "{label: discord_t05, name: discord, tau: 0.5})."
        )
    for label in labels:
        if not label.replace("_", "").replace("-", "").replace(".", "").isalnum():
            out.append(
                f"{prefix}: label {label!r}: use letters, digits, '_', '-' and '.' (it names a folder)."
            )
    for i, section in enumerate(students):
        out.extend(loss_problems(section, prefix=f"{prefix}[{i}]"))
    return out


@dataclass
class DemoConfig:
    """``nemo-dcod demo``: the whole pipeline on a synthetic reasoning task, on CPU, in minutes.

    A program teacher writes step-by-step solutions in two styles (:mod:`nemo_dcod.demo.task`),
    prepare filters and packs them, two students (SFT and DisCorD) train from one initial
    checkpoint through the NeMo plug-in at TP=2, both are exported to Hugging Face and evaluated
    on held-out problems, and their exposure bias (ExAccErr) is measured against the teacher. It
    runs as a one-seed study (`nemo-dcod study`, :mod:`nemo_dcod.study.demo`).
    """

    run_dir: str = "runs/demo"
    """Where every artifact of the run goes; a previous demo run there is replaced."""
    seed: int = 0
    """Seeds problems, teacher samples, initialisation, data order and the exposure samplers."""
    start: str = field(default="warm", metadata={"choices": ("random", "warm")})
    """Where both students start: random (the untrained initialisation) | warm (a short SFT on a
    textbook corpus of shorter chains first, so the students already have the stepwise skill and
    what differs is what the loss does with it; `nemo-dcod study`'s start.kind=warm)."""
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
    students: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"name": "sft"},
            {
                "name": "discord",
                "tau": 0.25,
                "lambda_max": 0.75,
                "lambda_warmup_fraction": 0.4,
                "lambda_ramp_fraction": 0.2,
            },
        ],
        metadata=LOSS_SECTION,
    )
    """The students, trained side by side from one initialisation: each a loss section (its name
    and parameters) with an optional `label` (default: the loss name; labels must differ), e.g.
    `{label: discord_t05, name: discord, tau: 0.5}`."""

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
        out.extend(student_problems(self.students))
        return out
