"""``nemo-dcod prepare --dry-run``: the checks prepare applies at start, and the store it will make.

Prepare refuses at start: config problems, a tokenizer that cannot be loaded (not fast, no chat
template) or whose vocabulary is not the one the traces were sampled with, inputs that match no
file, an ``out_dir`` in the way (not a store, or a store of other inputs without ``overwrite``).
The dry run applies the same checks without reading a record, and with ``--store-plan FILE``
writes what the store will be (row length, vocabulary, packing, whether the traces carry teacher
log-probs) for the dry runs of ``score`` and ``train`` to check against
(:mod:`nemo_dcod.data.plan`).
"""

from __future__ import annotations

import json
from pathlib import Path

from nemo_dcod.config import ConfigError
from nemo_dcod.data.config import PrepareConfig
from nemo_dcod.data.plan import StoreFacts, write_plan

__all__ = ["dry_run_prepare", "planned_facts"]


def planned_facts(cfg: PrepareConfig, tokenizer: object) -> StoreFacts:
    """The facts of the store ``cfg`` will make, with ``tokenizer`` (as loaded by prepare)."""
    from nemo_dcod.data.prepare import pad_token_id

    return StoreFacts(
        seq_length=cfg.seq_length,
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        pad_token_id=pad_token_id(tokenizer),
        packed=cfg.packing != "none",
        teacher_logprobs="generation" if cfg.fields.has_teacher() else None,
        topk=0,
        source=f"nemo-dcod prepare --dry-run ({cfg.out_dir})",
    )


def dry_run_prepare(cfg: PrepareConfig, store_plan: str | None = None, made_later: bool = False) -> int:
    """Validate ``cfg`` as prepare would at start; print the plan; write it to ``store_plan``.

    Args:
        cfg: the prepare config, merged but not yet validated.
        store_plan: write the planned store's facts here.
        made_later: the trace files are written by an earlier job (``nemo-dcod generate``):
            their existence is checked by the job.

    Returns:
        0 (problems raise).

    Raises:
        ConfigError: every problem found, at once.
    """
    from nemo_dcod.data.readers import DataError, expand_inputs
    from nemo_dcod.data.tokenize import check_same_vocabulary, load_tokenizer, teacher_vocabulary

    problems = cfg.problems()
    tokenizer = None
    if cfg.tokenizer:
        try:
            tokenizer = load_tokenizer(cfg.tokenizer, cfg.chat_template)
            check_same_vocabulary(teacher_vocabulary(cfg), tokenizer, cfg.tokenizer)
        except DataError as exc:
            problems.append(str(exc))
    inputs = "made by an earlier job"
    if not made_later and cfg.inputs:
        try:
            inputs = f"{len(expand_inputs(cfg.inputs, cfg.format))} input(s)"
        except DataError as exc:
            problems.append(str(exc))
    problems.extend(_out_dir_problems(cfg))
    if problems or tokenizer is None:
        raise ConfigError(problems, "dry run")
    facts = planned_facts(cfg, tokenizer)
    print(
        f"prepare: {inputs} -> {cfg.out_dir}: {facts.seq_length}-token rows, packing {cfg.packing}, "
        f"vocabulary {facts.vocab_size}, teacher log-probs "
        f"{'from the traces' if facts.teacher_logprobs else 'none (run score)'}: config ok"
    )
    if store_plan:
        write_plan(store_plan, facts)
        print(f"prepare: store plan written to {store_plan}")
    return 0


def _out_dir_problems(cfg: PrepareConfig) -> list[str]:
    """What prepare's start would refuse about ``out_dir`` (see ``_prepare_out_dir``)."""
    out = Path(cfg.out_dir)
    manifest = out / "manifest.json"
    if manifest.is_file():
        if cfg.overwrite:
            return []
        try:
            settings = json.loads(manifest.read_text()).get("settings")
        except (OSError, ValueError):
            return [f"out_dir={out}: unreadable manifest.json; remove the directory or set overwrite=true."]
        if settings != cfg.content_settings():
            return [
                f"out_dir={out} holds a complete store made with other settings: set overwrite=true to "
                "replace it, or choose another out_dir."
            ]
        return []  # same settings: the run finishes or keeps it (the inputs' identity is checked there)
    if out.is_dir() and any(out.iterdir()) and not (out / "shards").is_dir():
        return [f"out_dir={out} is a non-empty directory that is not a store: choose another out_dir."]
    return []
