"""Everything ``generate`` checks and decides before it loads a model, and its dry run.

In order, each failure a :class:`GenerateError` naming what to fix: the teacher directory (a
``config.json``, tokenizer files), every problem record (:mod:`.problems`), the tokenizer and its
chat template, every prompt rendered and tokenized, prompt + ``max_new_tokens`` against the
teacher's context (``max_position_embeddings``, or vLLM's ``max_model_len``), vLLM's tensor-parallel
size against the attention heads, and which worker this process is. Then the shards are planned
and each one's key computed. ``nemo-dcod generate --dry-run`` does all of this and prints the plan
(no model is loaded, so it runs on a login node, validating a GPU recipe as on its GPU node).

**The end-of-turn token.** A chat model ends its answer with a token the chat template also
writes after an assistant turn (Llama 3's ``<|eot_id|>``, ChatML's ``<|im_end|>``): the template's
first token after a turn's content, when it is one of the teacher's end-of-sequence ids or a
special token. It always stops generation, even where the checkpoint's ``generation_config.json``
names another end-of-sequence id (a converted checkpoint may name ``<|endoftext|>`` alone, and the
teacher would write past its turn). A trace that ended with it keeps it (and its log-prob) as its
last teacher token: ``prepare`` places that log-prob on the end-of-turn token of its own rendering
of the turn, so the student is taught to stop with the teacher's own probability of stopping.
Any other ending (a stop string, another end-of-sequence id) is left out.

**The vocabulary fingerprint** (:func:`nemo_dcod.data.tokenize.vocabulary_fingerprint` of the
tokenizer) goes into every shard's meta and the ``prepare.yaml`` the run writes: ``prepare``
compares it with the student's tokenizer and, when they are the same, uses the sampled token ids
as they are instead of re-tokenizing the response text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_dcod.generate.config import GenerateConfig, GenerateError
from nemo_dcod.generate.problems import TraceProblem, load_problems
from nemo_dcod.generate.shards import ShardPlan, plan_shards, shard_done, teacher_identity
from nemo_dcod.parallel.launch import WorkerSlot, worker_slot

__all__ = ["RunPlan", "build_plan", "dry_run_generate", "end_of_turn_id", "resolve_slot"]

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class RunPlan:
    """A validated run: problems, their prompts as token ids, the shards, this worker."""

    problems: list[TraceProblem]
    messages: list[str]
    """Per problem, the user message (the prompt template filled in): a trace's ``prompt``."""
    prompt_ids: list[list[int]]
    """Per problem, what the teacher is given: the chat template's rendering, tokenized."""
    tokenizer: Any
    tokenizer_path: str
    chat_template: str | None
    """The chat template's text when the config replaced the tokenizer's; else None."""
    stop_ids: list[int]
    """Ids that end a trace: the teacher's end-of-sequence ids and the end-of-turn token."""
    end_of_turn_id: int | None
    vocabulary: str
    """The tokenizer's vocabulary fingerprint (what prepare compares with the student's)."""
    context: int | None
    """Tokens the teacher (or vLLM's max_model_len) allows, prompt and trace together."""
    model_config: dict[str, Any]
    shards: list[ShardPlan]
    slot: WorkerSlot

    @property
    def mine(self) -> list[ShardPlan]:
        """This worker's shards."""
        return [s for s in self.shards if s.index % self.slot.count == self.slot.index]


def resolve_slot(cfg: GenerateConfig) -> WorkerSlot:
    """This worker: from the config when set, else from the launcher's environment.

    Raises:
        GenerateError: an environment the launcher parser cannot place.
    """
    if cfg.worker_index is not None and cfg.num_workers is not None:
        return WorkerSlot(cfg.worker_index, cfg.num_workers, 0, "config (worker_index, num_workers)")
    try:
        return worker_slot()
    except ValueError as exc:
        raise GenerateError(f"{exc} (worker_index=I num_workers=N)") from None


def _model_config(cfg: GenerateConfig) -> dict[str, Any]:
    path = Path(cfg.teacher)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise GenerateError(
            f"teacher={cfg.teacher}: no config.json there; point it at a Hugging Face checkpoint directory "
            "(config.json + safetensors + tokenizer, e.g. what `nemo-dcod export --hf-out DIR` writes)."
        )
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise GenerateError(f"{config_file}: not a readable JSON config: {exc}") from None
    tokenizer = Path(cfg.tokenizer or cfg.teacher)
    if not any((tokenizer / f).is_file() for f in _TOKENIZER_FILES):
        raise GenerateError(
            f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {tokenizer}; set tokenizer to the "
            "teacher's tokenizer directory."
        )
    return config


def _context(cfg: GenerateConfig, config: dict[str, Any]) -> int | None:
    sources = [config, config.get("text_config") or {}]
    model_context = next((int(c[k]) for c in sources for k in _CONTEXT_KEYS if c.get(k)), None)
    if cfg.max_model_len is not None:
        if model_context is not None and cfg.max_model_len > model_context:
            raise GenerateError(
                f"max_model_len={cfg.max_model_len} > the teacher's context of {model_context} tokens "
                f"(config.json max_position_embeddings); lower it or set it to null."
            )
        return cfg.max_model_len
    return model_context


def end_of_turn_id(tokenizer: Any, cfg: GenerateConfig, stop_ids: list[int]) -> int | None:
    """The token the chat template writes right after an assistant turn's content, when it is an
    end-of-sequence id or a special token; else None (see the module docstring)."""
    if not cfg.use_chat_template:
        return None
    content = "0"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "1"}, {"role": "assistant", "content": content}],
            tokenize=False,
            **cfg.chat_template_kwargs,
        )
    except Exception:  # a template that insists on its own conversation shape: no end-of-turn known
        return None
    at = text.rfind(content)
    if at < 0:
        return None
    after = tokenizer(text[at + len(content) :], add_special_tokens=False)["input_ids"]
    first = next((int(t) for t in after), None)
    if first is None:
        return None
    special = set(tokenizer.all_special_ids)
    special.update(int(i) for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return first if first in stop_ids or first in special else None


def _check_lengths(
    cfg: GenerateConfig, plan_ids: list[list[int]], problems: list[TraceProblem], context: int
) -> None:
    budget = context - cfg.sampling.max_new_tokens
    over = [i for i, ids in enumerate(plan_ids) if len(ids) > budget]
    if not over:
        return
    worst = max(over, key=lambda i: len(plan_ids[i]))
    where = "max_model_len" if cfg.max_model_len is not None else "the teacher's max_position_embeddings"
    raise GenerateError(
        f"{len(over)} prompt(s) + sampling.max_new_tokens={cfg.sampling.max_new_tokens} exceed the context "
        f"of {context} tokens ({where}); the longest, {problems[worst].location}, has "
        f"{len(plan_ids[worst])} prompt tokens. Lower sampling.max_new_tokens to at most "
        f"{context - len(plan_ids[worst])}, shorten the prompt_template, or leave those problems out."
    )


def build_plan(cfg: GenerateConfig) -> RunPlan:
    """Check the inputs and plan the run (see the module docstring); loads no model.

    Raises:
        GenerateError: the first failed check, naming the file, record or field.
    """
    from nemo_dcod.data.tokenize import vocabulary_fingerprint
    from nemo_dcod.eval.generation import encode_prompts, load_tokenizer, stop_token_ids

    config = _model_config(cfg)
    problems = load_problems(cfg)
    tokenizer_path = cfg.tokenizer or cfg.teacher
    try:
        tokenizer = load_tokenizer(tokenizer_path, cfg.chat_template)
    except (OSError, ValueError) as exc:
        raise GenerateError(f"tokenizer {tokenizer_path}: cannot be loaded: {exc}") from None
    messages = [cfg.prompt_template.replace("{problem}", p.text) for p in problems]
    try:
        _, prompt_ids = encode_prompts(
            tokenizer, messages, cfg.use_chat_template, cfg.system_prompt, cfg.chat_template_kwargs
        )
    except ValueError as exc:
        raise GenerateError(f"tokenizer {tokenizer_path}: {exc}") from None
    except Exception as exc:  # jinja raises TemplateError and whatever the template raises
        raise GenerateError(f"tokenizer {tokenizer_path}: the chat template failed: {exc}") from None
    context = _context(cfg, config)
    if context is not None:
        _check_lengths(cfg, prompt_ids, problems, context)
    tp = cfg.tensor_parallel_size
    heads = config.get("num_attention_heads") or (config.get("text_config") or {}).get("num_attention_heads")
    if cfg.backend == "vllm" and heads and int(heads) % tp:
        raise GenerateError(
            f"tensor_parallel_size={tp} does not divide the teacher's {heads} attention heads; use a divisor."
        )
    stop_ids = stop_token_ids(cfg.teacher, tokenizer)
    end_of_turn = end_of_turn_id(tokenizer, cfg, stop_ids)
    if end_of_turn is not None and end_of_turn not in stop_ids:
        stop_ids = sorted([*stop_ids, end_of_turn])
    if not stop_ids:
        raise GenerateError(
            f"teacher={cfg.teacher}: neither generation_config.json nor the tokenizer names an "
            "end-of-sequence token, and the chat template ends no turn with a special token; every "
            "trace would run to max_new_tokens. Set eos_token_id in generation_config.json."
        )
    shards = plan_shards(
        problems,
        cfg.problems_per_shard,
        cfg.content_settings(),
        teacher_identity(cfg.teacher, cfg.tokenizer),
        cfg.sampling.seed,
    )
    return RunPlan(
        problems=problems,
        messages=messages,
        prompt_ids=prompt_ids,
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path,
        chat_template=tokenizer.chat_template if cfg.chat_template is not None else None,
        stop_ids=stop_ids,
        end_of_turn_id=end_of_turn,
        vocabulary=vocabulary_fingerprint(tokenizer),
        context=context,
        model_config=config,
        shards=shards,
        slot=resolve_slot(cfg),
    )


def describe(cfg: GenerateConfig, plan: RunPlan, done: int) -> list[str]:
    """The plan as printed lines (the dry run's output, and the start of a run's log)."""
    s = cfg.sampling
    lengths = [len(ids) for ids in plan.prompt_ids]
    arch = ",".join(plan.model_config.get("architectures") or ["?"])
    context = f"context {plan.context} tokens" if plan.context else "context unknown"
    mode = "greedy" if s.temperature == 0 else f"temperature {s.temperature}, top_p {s.top_p}"
    eot = (
        plan.tokenizer.convert_ids_to_tokens(plan.end_of_turn_id) if plan.end_of_turn_id is not None else None
    )
    return [
        f"generate: {len(plan.problems)} problems -> {len(plan.shards)} shard(s) of up to "
        f"{cfg.problems_per_shard}; {s.samples_per_problem} sample(s) each ({mode}, seed {s.seed}, "
        f"max_new_tokens {s.max_new_tokens}) = {len(plan.problems) * s.samples_per_problem} samples",
        f"generate: teacher {cfg.teacher} ({arch}, {context}); backend {cfg.backend}; prompts "
        f"{min(lengths)}-{max(lengths)} tokens; stop ids {plan.stop_ids}; end-of-turn token kept: {eot!r}",
        f"generate: worker {plan.slot.index} of {plan.slot.count} ({plan.slot.source}): "
        f"{len(plan.mine)} shard(s), {done} already done -> {cfg.out_dir}",
    ]


def dry_run_generate(cfg: GenerateConfig) -> int:
    """``nemo-dcod generate --dry-run``: validate the config as on the machine it is for (a vLLM
    recipe as on a GPU node), read every problem, render every prompt, check the lengths, print
    the plan; load no model, generate nothing.

    Returns:
        0 when the run is possible, 1 when an input is not (the reason printed).

    Raises:
        ConfigError: invalid config values (the CLI prints them, exit 2).
    """
    import sys

    from nemo_dcod.config import ConfigError

    problems = cfg.problems(has_gpu=True if cfg.backend == "vllm" else None)
    if problems:
        raise ConfigError(problems, "generate")
    try:
        plan = build_plan(cfg)
        out = Path(cfg.out_dir)
        done = sum(shard_done(out, s, cfg.overwrite) for s in plan.mine)
    except GenerateError as exc:
        print(f"nemo-dcod generate --dry-run: {exc}", file=sys.stderr)
        return 1
    for line in describe(cfg, plan, done):
        print(line)
    if cfg.backend == "vllm":
        from nemo_dcod.eval.generation import vllm_available

        if not vllm_available():
            print(
                "generate: vLLM is not installed here; the job's environment must have it (pip install vllm)."
            )
    print("generate: dry run ok (no model loaded, nothing generated)")
    return 0
