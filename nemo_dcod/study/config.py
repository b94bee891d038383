"""``nemo-dcod study``'s schema: the task, the start, the shared schedule, the students, the seeds.

A study trains every labelled student (a loss section each) on every seed through the real
pipeline and compares them over seeds. What is shared by all students of a seed (the problems,
the teacher's traces, the store, the initial checkpoint) is made once per seed; what differs is
the loss section. Every field carries its docstring (``nemo-dcod study --help``).

Task presets (:data:`TASK_PRESETS`): ``styles`` is the demo's two-style task (a stepwise style the
student can learn and a one-token shortcut it cannot, the teacher preferring the shortcut);
``long_chain`` is one style over long chains (8 operations, ~50 response tokens), where an error
in the student's own prefix carries into every later line (the teacher continues from whatever
values a prefix wrote), so exposure bias is what is measured. A field of ``task`` left null takes
the preset's value.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from nemo_dcod.config import LOSS_SECTION, choice_problems
from nemo_dcod.demo.config import student_problems
from nemo_dcod.losses.registry import label_of

__all__ = [
    "TASK_PRESETS",
    "EvaluationSection",
    "StartSection",
    "StudyConfig",
    "StudyError",
    "TaskSection",
    "TrainingSection",
    "student_problems",
]


class StudyError(RuntimeError):
    """A study (or the demo) failed; the message names the job and its log."""


TASK_PRESETS: dict[str, dict[str, Any]] = {
    "styles": {
        "num_ops": 3,
        "modulus": 5,
        "num_train_problems": 3000,
        "num_eval_problems": 200,
        "shortcut_prob": 0.65,
        "step_error": 0.02,
        "shortcut_error": 0.2,
        "teacher_noise": 1e-3,
        "seq_length": 128,
    },
    "long_chain": {
        "num_ops": 8,
        "modulus": 5,
        "num_train_problems": 3000,
        "num_eval_problems": 200,
        "shortcut_prob": 0.0,
        "step_error": 0.02,
        "shortcut_error": 0.2,
        "teacher_noise": 1e-3,
        "seq_length": 160,
    },
}
"""Named tasks: the values a ``task`` section's null fields take."""


@dataclass
class TaskSection:
    """The synthetic task and its program teacher (null fields: the preset's value)."""

    preset: str = field(default="styles", metadata={"choices": tuple(TASK_PRESETS)})
    """styles (stepwise vs a one-token shortcut, the demo's task) | long_chain (8 stepwise lines)."""
    num_ops: int | None = None
    """Operations per problem (a stepwise trace has one line each)."""
    modulus: int | None = None
    """Arithmetic modulo this; digits 0..modulus-1 are the task's number words."""
    num_train_problems: int | None = None
    """Problems the teacher writes one trace each for (before the correctness filter)."""
    num_eval_problems: int | None = None
    """Held-out problems (never in training) for accuracy, forced-style skill and ExAccErr."""
    shortcut_prob: float | None = None
    """Teacher: probability of the one-token shortcut style (0: stepwise only)."""
    step_error: float | None = None
    """Teacher: probability that a stepwise line's result is wrong."""
    shortcut_error: float | None = None
    """Teacher: probability that the shortcut's answer is wrong."""
    teacher_noise: float | None = None
    """Teacher: probability mass spread over every response word at each step (keeps KL finite)."""
    seq_length: int | None = None
    """Tokens per packed training row."""

    def resolved(self) -> TaskSection:
        """This section with every null field set from its preset."""
        preset = TASK_PRESETS.get(self.preset, TASK_PRESETS["styles"])
        values = {k: preset[k] if getattr(self, k) is None else getattr(self, k) for k in preset}
        return dataclasses.replace(self, **values)

    def problems(self, prefix: str = "task") -> list[str]:
        """Every invalid value of the resolved section, naming the field."""
        out = choice_problems(self, prefix)
        t = self.resolved()
        assert t.num_ops is not None and t.modulus is not None and t.seq_length is not None
        assert t.num_train_problems is not None and t.num_eval_problems is not None
        assert t.teacher_noise is not None
        for name in ("num_ops", "num_train_problems", "num_eval_problems"):
            if getattr(t, name) < 1:
                out.append(f"{prefix}.{name}={getattr(t, name)}: must be >= 1.")
        if t.modulus < 2:
            out.append(f"{prefix}.modulus={t.modulus}: must be >= 2.")
        for name in ("shortcut_prob", "step_error", "shortcut_error"):
            if not 0 <= getattr(t, name) <= 1:
                out.append(f"{prefix}.{name}={getattr(t, name)}: must be a probability in [0, 1].")
        if not 0 < t.teacher_noise < 1:
            out.append(
                f"{prefix}.teacher_noise={t.teacher_noise}: must be in (0, 1); 0 makes the KL infinite."
            )
        longest = 6 + 2 * t.num_ops + 1 + 6 * t.num_ops + 2  # chat markup + prompt + stepwise response
        if t.seq_length < longest:
            out.append(
                f"{prefix}.seq_length={t.seq_length}: a num_ops={t.num_ops} trace takes up to {longest} "
                "tokens; raise seq_length to at least that."
            )
        space = t.modulus * (2 * t.modulus) ** t.num_ops
        wanted = t.num_train_problems + t.num_eval_problems
        if t.modulus >= 2 and t.num_ops >= 1 and space < wanted:
            out.append(
                f"{prefix}.num_ops={t.num_ops}, modulus={t.modulus} give {space} distinct problems, fewer "
                f"than num_train_problems + num_eval_problems = {wanted}: raise num_ops or modulus."
            )
        return out


@dataclass
class StartSection:
    """Where every student of a seed starts: one checkpoint made once per seed, loaded by all."""

    kind: str = field(default="random", metadata={"choices": ("random", "warm")})
    """random: the untrained initialisation of the seed (saved by a 1-step run at lr 1e-30) | warm:
    a checkpoint pretrained with SFT on related but different text (see warm_num_ops)."""
    warm_num_ops: list[int] | None = None
    """warm: the chain lengths of the warm-up corpus: correct stepwise solutions with no style word,
    written by a plain "textbook" process (never the task's teacher, never a shortcut), to chains
    shorter than the task's; null: 1 .. ceil(num_ops / 2)."""
    warm_problems: int = 3000
    """warm: documents in the warm-up corpus (problems may repeat: short chains are few)."""
    warm_steps: int = 300
    """warm: SFT steps on the warm-up corpus."""
    warm_lr: float = 3e-3
    """warm: peak learning rate of the warm-up (warm-up and cosine decay as the students')."""

    def lengths(self, num_ops: int) -> list[int]:
        """The warm-up corpus's chain lengths for a task of ``num_ops`` operations."""
        if self.warm_num_ops:
            return list(self.warm_num_ops)
        return list(range(1, math.ceil(num_ops / 2) + 1))

    def problems(self, prefix: str = "start") -> list[str]:
        """Every invalid value, naming the field."""
        out = choice_problems(self, prefix)
        if self.warm_num_ops is not None and (not self.warm_num_ops or min(self.warm_num_ops) < 1):
            out.append(f"{prefix}.warm_num_ops={self.warm_num_ops}: list chain lengths >= 1, or null.")
        for name in ("warm_problems", "warm_steps"):
            if getattr(self, name) < 1:
                out.append(f"{prefix}.{name}={getattr(self, name)}: must be >= 1.")
        if self.warm_lr <= 0:
            out.append(f"{prefix}.warm_lr={self.warm_lr}: must be > 0.")
        return out


@dataclass
class TrainingSection:
    """The schedule and the student every loss trains with (the same for all students)."""

    steps: int = 600
    """Optimizer steps of each student."""
    global_batch_size: int = 16
    """Packed rows per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate (linear warm-up over min(10, steps/10) steps, cosine decay to lr/10)."""
    hidden_size: int = 64
    """Students' width (the tiny Llama 3.1: 4 layers, 4 heads)."""
    ffn_hidden_size: int = 128
    """Students' MLP width."""
    tensor_model_parallel_size: int = 1
    """TP of every training (one gloo process per rank on CPU); 1 or 2 (the tiny model's heads)."""
    topk: int = 8
    """Teacher top-k written into each seed's store, exactly, from the program teacher (kl, todi
    and DisCorD's kl base read it); 0: none."""
    shuffle: bool = True
    """``data.shuffle`` of every training of the study, the warm start's included; False serves
    the store's rows in store order every epoch (longest documents first), as all runs did before
    2026-12-07: for measuring what the order did to earlier results."""

    def problems(self, prefix: str = "training") -> list[str]:
        """Every invalid value, naming the field."""
        out = []
        for name in ("steps", "global_batch_size", "hidden_size", "ffn_hidden_size"):
            if getattr(self, name) < 1:
                out.append(f"{prefix}.{name}={getattr(self, name)}: must be >= 1.")
        if self.lr <= 0:
            out.append(f"{prefix}.lr={self.lr}: must be > 0.")
        if self.tensor_model_parallel_size not in (1, 2):
            out.append(
                f"{prefix}.tensor_model_parallel_size={self.tensor_model_parallel_size}: the tiny student "
                "has 4 attention heads in 2 query groups; TP must divide both (1 or 2)."
            )
        if self.topk < 0:
            out.append(f"{prefix}.topk={self.topk}: must be >= 0.")
        return out


@dataclass
class EvaluationSection:
    """What is measured on each exported student (held-out problems of its seed)."""

    num_samples: int = 4
    """k of the sampled accuracy avg@k (temperature below); 0: greedy accuracy only."""
    temperature: float = 1.0
    """Sampling temperature of avg@k (1: the student's own distribution)."""
    exposure_samples: int = 200
    """Student and teacher prefixes sampled for ExAccErr (one per held-out problem)."""

    def problems(self, prefix: str = "evaluation") -> list[str]:
        """Every invalid value, naming the field."""
        out = []
        if self.num_samples < 0:
            out.append(f"{prefix}.num_samples={self.num_samples}: must be >= 0.")
        if self.num_samples and self.temperature <= 0:
            out.append(f"{prefix}.temperature={self.temperature}: must be > 0 for avg@k.")
        if self.exposure_samples < 1:
            out.append(f"{prefix}.exposure_samples={self.exposure_samples}: must be >= 1.")
        return out


@dataclass
class StudyConfig:
    """``nemo-dcod study``: labelled students x seeds through the real pipeline, compared over seeds.

    Per seed, once: the task's problems, the program teacher's traces (exact log-probs and top-k),
    prepare's store, and one initial checkpoint (random or warm). Per student and seed: `nemo-dcod
    train` from that checkpoint, export, greedy and sampled eval, forced-style skill, ExAccErr.
    Finished work is kept (a student's summary is written last): a rerun, or another config with
    the same run_dir, trains only what is missing. The report (summary.json, summary.md, plots)
    gives every student's mean and std over seeds and a paired comparison with the baseline.
    """

    name: str = "study"
    """The study's name: its report folder (<run_dir>/report_<name>) and results folder."""
    run_dir: str = "runs/study"
    """Seeds' data and checkpoints and every student's run; shared by configs of one task and start
    (a finished student with the same settings is reused, never retrained)."""
    results_dir: str | None = None
    """Also copy the report (summary.json, summary.md, plots) to <results_dir>/study_<name>_<date>/;
    null: only in run_dir."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds (problems, teacher samples, initialisation, data order, samplers); one shared start each."""
    baseline: str = "sft"
    """Label of the student every other is compared with, seed by seed."""
    reduced: bool = False
    """CI sizes: 300 training problems, 32 held-out, 8 steps (warm-up 8), 16 exposure samples, k <= 2."""
    parallel: int = 2
    """Jobs run at once (a job trains with tensor_model_parallel_size processes); 2 cores: 2 at TP=1."""
    task: TaskSection = field(default_factory=TaskSection)
    start: StartSection = field(default_factory=StartSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    students: list[dict[str, Any]] = field(
        default_factory=lambda: [{"name": "sft"}, {"name": "discord"}], metadata=LOSS_SECTION
    )
    """The students: each a loss section (its name and parameters) with a `label` (default: the loss
    name; labels differ), e.g. `{label: discord_t05, name: discord, tau: 0.5}`."""

    def resolved(self) -> StudyConfig:
        """The sizes this study runs with: the preset's task values, and the CI sizes when ``reduced``."""
        task = self.task.resolved()
        if not self.reduced:
            return dataclasses.replace(self, task=task)
        assert task.num_train_problems is not None and task.num_eval_problems is not None
        return dataclasses.replace(
            self,
            task=dataclasses.replace(
                task,
                num_train_problems=min(task.num_train_problems, 300),
                num_eval_problems=min(task.num_eval_problems, 32),
            ),
            start=dataclasses.replace(
                self.start,
                warm_problems=min(self.start.warm_problems, 300),
                warm_steps=min(self.start.warm_steps, 8),
            ),
            training=dataclasses.replace(self.training, steps=min(self.training.steps, 8)),
            evaluation=dataclasses.replace(
                self.evaluation,
                num_samples=min(self.evaluation.num_samples, 2),
                exposure_samples=min(self.evaluation.exposure_samples, 16),
            ),
        )

    def problems(self) -> list[str]:
        """Every problem of the config at once, each naming its field."""
        out = []
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            out.append(f"name={self.name!r}: use letters, digits, '_' and '-' (it names folders).")
        if not self.seeds:
            out.append("seeds: list at least one seed.")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            out.append(f"seeds={self.seeds}: must be distinct and >= 0.")
        if self.parallel < 1:
            out.append(f"parallel={self.parallel}: must be >= 1.")
        out.extend(self.task.problems())
        out.extend(self.start.problems())
        out.extend(self.training.problems())
        out.extend(self.evaluation.problems())
        out.extend(student_problems(self.students))
        labels = [label_of(s) for s in self.students]
        if self.students and self.baseline not in labels:
            out.append(f"baseline={self.baseline!r}: not a student's label; the labels are {labels}.")
        n_eval = self.task.resolved().num_eval_problems or 0
        if self.evaluation.exposure_samples > n_eval:
            out.append(
                f"evaluation.exposure_samples={self.evaluation.exposure_samples} > task.num_eval_problems="
                f"{n_eval}: prefixes are sampled on held-out problems, one each."
            )
        return out
