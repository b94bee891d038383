"""``nemo-dcod eval``: math reasoning benchmarks on an exported Hugging Face checkpoint.

The modules, in the order a problem goes through them:

* :mod:`~nemo_dcod.eval.benchmarks`: GSM8K, MATH, MATH500, AMC, AIME and OlympiadBench files in
  their public formats -> :class:`~nemo_dcod.eval.benchmarks.Problem` objects and prompts.
* :mod:`~nemo_dcod.eval.generation`: batched generation with transformers (or vLLM when installed).
* :mod:`~nemo_dcod.eval.answers`: the final answer of a completion (``\\boxed{}``, ``####``, fallback).
* :mod:`~nemo_dcod.eval.grading`: is it equivalent to the reference (math-verify, with a timeout)?
* :mod:`~nemo_dcod.eval.report`: pass@1 / avg@k with standard errors, results JSON, table, plot.
* :mod:`~nemo_dcod.eval.run`: :func:`~nemo_dcod.eval.run.run_eval`, the stage, driven by
  :class:`~nemo_dcod.eval.config.EvalConfig`.

Nothing is imported here: validating an eval config must not load transformers or math-verify.
"""
