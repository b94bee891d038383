"""``nemo-dcod study``: labelled students x seeds through the real pipeline, compared over seeds.

config.py    the schema: task presets (styles, long_chain), start (random | warm), schedule, students
tasks.py     a seed's problems, the program teacher's traces, the held-out set, the warm-up corpus
signals.py   the program teacher's exact top-k, written into the store as `score` would
launch.py    one `nemo-dcod train` run in its own process tree
seeds.py     a seed's shared part: task files, store, the one initial checkpoint every student loads
student.py   one student on one seed: train, export, eval (greedy, avg@k), skill, ExAccErr, summary
jobs.py      each prep / student a process, a few at a time, resumable
stats.py     mean ± std over seeds, the paired t interval and sign count against the baseline
report.py    summary.json, summary.md (tables rendered from the JSON only)
plots.py     study.png, weights.png
run.py       run_study: plan, run what is missing, report
demo.py      `nemo-dcod demo`: the two-student, one-seed study
choice.py    why the weights move the skill more than the choice (python -m nemo_dcod.study.choice)

Nothing here is imported by the other packages; it uses them (demo's task, teacher and measures,
data, train, convert, eval) the way a user would, through their config dataclasses.
"""

from typing import Any

from nemo_dcod.study.config import StudyConfig, StudyError

__all__ = ["StudyConfig", "StudyError", "run_study"]


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """See :func:`nemo_dcod.study.run.run_study` (imported on use)."""
    from nemo_dcod.study.run import run_study as run

    return run(cfg)
