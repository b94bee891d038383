"""``nemo-dcod demo``: the whole pipeline on a synthetic reasoning task (see :mod:`.pipeline`).

task.py      the arithmetic task, its two solution styles, its tokenizer
teacher.py   the program teacher: exact p(. | any prefix), traces with exact log-probs
exposure.py  ExAccErr (MiniLLM appendix B.5), computed exactly against the program teacher
skill.py     accuracy with the style forced: a student's skill apart from its choice of style
pipeline.py  teacher -> prepare -> train (TP=2, torchrun) -> export -> eval -> exposure, one run dir
report.py    summary.json, the table, the plot
"""

from nemo_dcod.demo.pipeline import DemoError, run_demo

__all__ = ["DemoError", "run_demo"]
