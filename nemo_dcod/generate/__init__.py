"""``nemo-dcod generate``: stage 0 of the pipeline, teacher traces from problems.

A teacher (a Hugging Face checkpoint) answers every problem ``samples_per_problem`` times through
eval's generators (transformers, batched and left-padded, on CPU or GPU; vLLM with tensor
parallelism when installed); each trace carries the teacher's per-token log-probs under its
untempered distribution and eval's verdict on its final answer, and goes into resumable JSONL
shards that ``nemo-dcod prepare`` reads with the ``prepare.yaml`` the run writes.

Modules: :mod:`.config` (the schema), :mod:`.problems` (reading and validating problems),
:mod:`.plan` (every check before a model is loaded; the dry run), :mod:`.shards` (layout, keys,
atomic writes, resume), :mod:`.report` (counts, the report, the prepare config), :mod:`.run` (the
stage).
"""

from nemo_dcod.generate.config import GenerateConfig, GenerateError

__all__ = ["GenerateConfig", "GenerateError"]
