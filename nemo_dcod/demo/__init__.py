"""The demo's synthetic task and its measures; ``nemo-dcod demo`` itself is :mod:`nemo_dcod.study.demo`.

config.py    DemoConfig: the embedded default's schema (`nemo-dcod demo`)
task.py      the arithmetic task, its two solution styles, its tokenizer
teacher.py   the program teacher: exact p(. | any prefix), traces with exact log-probs
exposure.py  ExAccErr (MiniLLM appendix B.5), computed exactly against the program teacher
skill.py     accuracy with the style forced: a student's skill apart from its choice of style

The demo runs as a two-student, one-seed study (:mod:`nemo_dcod.study`), which builds on these.
"""
