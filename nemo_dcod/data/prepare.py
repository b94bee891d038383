"""``nemo-dcod prepare``: teacher traces -> a packed, sharded, versioned sample store.

    nemo-dcod prepare --config conf/prepare_tiny.yaml
    nemo-dcod prepare --config conf/prepare_tiny.yaml inputs='[traces/*.jsonl]' seq_length=8192 workers=16

The inputs are cut into shards of ``records_per_shard`` records (:func:`~nemo_dcod.data.readers.plan_shards`);
each shard is read, validated, tokenized, packed and written by one worker, on its own, so the
store does not depend on the number of workers. A shard's *key* hashes what decides its content:
the input file's identity (path, size, mtime), the record range, the content settings of the
config and the tokenizer's fingerprint. Re-running skips every shard whose key matches and
redoes the others; a finished store (same keys) is left as is. The manifest is written last,
atomically: until it exists the store is incomplete and :class:`~nemo_dcod.data.store.PackedStore`
refuses it.

**Nothing usable is an error.** A run that keeps no document (empty inputs, another format under a
JSONL name, every record bad or filtered out) writes report.json but no manifest and raises
:class:`~nemo_dcod.data.readers.DataError` naming the inputs and the skip counts: a store of zero
rows is never reported as a success. A write that fails (no space left, no permission) is a
:class:`~nemo_dcod.data.store.StoreWriteError`; the manifest is not written either.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from nemo_dcod.data.config import PrepareConfig
from nemo_dcod.data.readers import (
    BAD_RECORD_REASONS,
    DataError,
    RecordError,
    ShardSpec,
    expand_inputs,
    input_identity,
    parse_record,
    plan_shards,
    read_shard,
)
from nemo_dcod.data.store import (
    ROW_COLUMNS,
    STORE_FORMAT,
    STORE_VERSION,
    TEACHER_COLUMNS,
    IncompleteStoreError,
    PackedStore,
    pack_documents,
    write_error,
    write_json_atomic,
    write_shard,
)
from nemo_dcod.data.tokenize import (
    Document,
    TraceTokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    unforeseen,
)

__all__ = ["run_prepare"]

_EXAMPLES = 3  # locations kept per skip reason, in each shard's info and the report


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def pad_token_id(tok: Any) -> int:
    """The token of padding positions: the tokenizer's pad token, else its end of sequence, else 0."""
    for value in (tok.pad_token_id, tok.eos_token_id):
        if value is not None:
            return int(value)
    return 0


# One tokenizer per worker process, loaded once by the pool's initializer.
_WORKER: dict[str, TraceTokenizer] = {}


def _init_worker(cfg: PrepareConfig) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    if "tokenizer" not in _WORKER:  # spawned (a forked worker inherits the parent's)
        _WORKER["tokenizer"] = TraceTokenizer(cfg)


def _pool_context() -> Any:
    """``fork`` where the platform has it, else ``spawn``.

    A forked worker inherits the imported modules and the loaded tokenizer; a spawned one spends
    seconds re-importing transformers and reloading the tokenizer, which dominated the run time
    of stores of a few shards (bench/prepare.py). Forking is safe here: the parent has not
    tokenized anything when the pool starts (the Rust tokenizer's thread pool does not exist yet,
    and ``tokenizers`` disables it in a child forked after use anyway) and runs no torch ops.
    """
    import multiprocessing

    return get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform == "linux" else "spawn"
    )


def _count(e: RecordError, cfg: PrepareConfig, skipped: Counter[str], examples: dict[str, list[str]]) -> None:
    if cfg.on_bad_record == "error" and e.reason in BAD_RECORD_REASONS:
        raise DataError(f"{e} (set on_bad_record=skip to count and skip such records)")
    skipped[e.reason] += 1
    if len(examples.setdefault(e.reason, [])) < _EXAMPLES:
        examples[e.reason].append(f"{e.location}: {e.detail}")


def build_shard(
    cfg: PrepareConfig, spec: ShardSpec, key: str, tokenizer: TraceTokenizer | None = None
) -> dict[str, Any]:
    """Read, tokenize, pack and write one shard; its info (also saved as its shard.json).

    Every record that cannot be used is counted under its reason (with ``on_bad_record=error``, a
    broken one raises :class:`DataError` instead); nothing a record holds ends the run otherwise.
    """
    tt = tokenizer if tokenizer is not None else _WORKER["tokenizer"]
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    traces = []
    read = 0
    for location, index, raw in read_shard(spec):
        read += 1
        try:
            traces.append(parse_record(raw, cfg.fields, location, index, cfg.system_prompt))
        except RecordError as exc:
            _count(exc, cfg, skipped, examples)
        except Exception as exc:  # whatever a hostile record raises is its skip, not the run's end
            _count(unforeseen(exc, location), cfg, skipped, examples)
    documents: list[Document] = []
    for item in tt.encode(traces):
        if isinstance(item, RecordError):
            _count(item, cfg, skipped, examples)
        else:
            documents.append(item)
    packed = pack_documents(
        documents, cfg.seq_length, pad_token_id(tt.tok), cfg.packing, teacher=cfg.fields.has_teacher()
    )
    info = {
        "key": key,
        "index": spec.index,
        "input": asdict(spec),
        "records_read": read,
        "records_kept": len(documents),
        "skipped": dict(sorted(skipped.items())),
        "skip_examples": examples,
        "documents": len(documents),
        "truncated": sum(d.truncated for d in documents),
        "teacher_filled_tokens": sum(d.filled for d in documents),
        "stop_logprobs": sum(d.stop_logprob for d in documents),
        "cut_off_kept": sum(d.cut_off for d in documents),
        "rows": packed.rows,
        "tokens": int((packed.columns["segment_ids"] >= 0).sum()),
        "loss_tokens": int(packed.columns["loss_mask"].sum()),
    }
    write_shard(Path(cfg.out_dir) / "shards" / _shard_name(spec.index), packed, info)
    return info


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def _existing_info(cfg: PrepareConfig, spec: ShardSpec, key: str) -> dict[str, Any] | None:
    """The info of a finished shard with this key whose files are whole; None: (re)build it."""
    where = Path(cfg.out_dir) / "shards" / _shard_name(spec.index)
    try:
        info: dict[str, Any] = json.loads((where / "shard.json").read_text())
        if info.get("key") != key:
            return None
        names = [*ROW_COLUMNS, *(["teacher_logprobs"] if cfg.fields.has_teacher() else [])]
        shapes = [np.load(where / f"{n}.npy", mmap_mode="r").shape for n in names]
        if any(shape != (info["rows"], cfg.seq_length) for shape in shapes):
            return None
        if np.load(where / "documents.npy", mmap_mode="r").shape != (info["documents"], 4):
            return None
    except (OSError, ValueError, KeyError):  # missing, truncated or not JSON/.npy
        return None
    return info


def _prepare_out_dir(out: Path, run_key: str, overwrite: bool) -> dict[str, Any] | None:
    """The report of a finished store with this key (nothing to do), else None (build/resume).

    Raises:
        DataError: ``out_dir`` holds something that is not a store, or a store from other inputs.
        StoreWriteError: ``out_dir`` cannot be written (no permission, read-only, full).
    """
    manifest_path = out / "manifest.json"
    try:
        if manifest_path.is_file():
            try:
                key = json.loads(manifest_path.read_text()).get("key")
            except (ValueError, AttributeError):  # damaged (not a JSON object): rebuild it
                key = None
            if key == run_key:
                try:
                    PackedStore(out)
                    report: dict[str, Any] = json.loads((out / "report.json").read_text())
                    return report
                except (IncompleteStoreError, OSError, json.JSONDecodeError):
                    pass  # damaged: rebuild what is missing
            elif key is not None and not overwrite:
                raise DataError(
                    f"out_dir={out} holds a complete store made from other inputs or settings: set "
                    "overwrite=true to replace it, or choose another out_dir."
                )
            manifest_path.unlink()  # from here on the store is incomplete until the new manifest lands
        elif out.is_dir() and any(out.iterdir()) and not (out / "shards").is_dir():
            raise DataError(
                f"out_dir={out} is a non-empty directory that is not a store: choose another out_dir."
            )
        (out / "shards").mkdir(parents=True, exist_ok=True)
        for stale in (out / "shards").glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
    except OSError as exc:
        raise write_error(Path(exc.filename) if exc.filename else out, exc) from exc
    return None


def _nothing_usable(
    cfg: PrepareConfig, inputs: list[tuple[str, str]], infos: list[dict[str, Any]], report: dict[str, Any]
) -> DataError:
    """The error of a run that kept no document: every input with its counts, the skip reasons."""
    per_input: dict[str, list[int]] = {path: [0, 0] for path, _ in inputs}
    for info in infos:
        counts = per_input[info["input"]["path"]]
        counts[0] += info["records_read"]
        counts[1] += info["records_kept"]
    listed = "; ".join(f"{path} ({read} records, {kept} kept)" for path, (read, kept) in per_input.items())
    skipped = ", ".join(f"{reason} {n}" for reason, n in report["skipped"].items()) or "none"
    example = next((locs[0] for locs in report["skip_examples"].values() if locs), None)
    why = (
        "the inputs hold no record (empty files?)"
        if report["records_read"] == 0
        else "every record was skipped: check the inputs' format and the field mapping (fields.*), "
        "or the policies that dropped them (answer_filter, overlong)"
    )
    return DataError(
        f"nothing usable: 0 documents kept of {report['records_read']} records read from "
        f"{listed}; skipped: {skipped}{f' (e.g. {example})' if example else ''}. {why}. "
        f"{cfg.out_dir} is not a store (no manifest.json; its report.json has the counts)."
    )


def _report(cfg: PrepareConfig, infos: list[dict[str, Any]], reused: int, seconds: float) -> dict[str, Any]:
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for info in infos:
        skipped.update(info["skipped"])
        for reason, locs in info["skip_examples"].items():
            examples.setdefault(reason, []).extend(locs[: _EXAMPLES - len(examples.get(reason, []))])
    total = {n: sum(i[n] for i in infos) for n in ("records_read", "records_kept", "documents", "truncated")}
    tokens = sum(i["tokens"] for i in infos)
    rows = sum(i["rows"] for i in infos)
    return {
        **total,
        "skipped": dict(sorted(skipped.items())),
        "skip_examples": dict(sorted(examples.items())),
        "shards": len(infos),
        "shards_reused": reused,
        "rows": rows,
        "seq_length": cfg.seq_length,
        "tokens": tokens,
        "loss_tokens": sum(i["loss_tokens"] for i in infos),
        "teacher_filled_tokens": sum(i["teacher_filled_tokens"] for i in infos),
        "teacher_fill_logprob": cfg.teacher_fill_logprob if cfg.fields.has_teacher() else None,
        "stop_logprobs": sum(i.get("stop_logprobs", 0) for i in infos),
        "cut_off_kept": sum(i.get("cut_off_kept", 0) for i in infos),
        "packing": cfg.packing,
        "packing_efficiency": tokens / (rows * cfg.seq_length) if rows else 0.0,
        "padding_tokens": rows * cfg.seq_length - tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else 0.0,
    }


def format_report(report: dict[str, Any], out_dir: str) -> str:
    """The report as the few lines prepare prints."""
    lines = [
        f"prepare: {out_dir}: {report['records_read']} records read, {report['records_kept']} kept "
        f"({report['truncated']} truncated), {sum(report['skipped'].values())} skipped",
    ]
    for reason, n in report["skipped"].items():
        first = report["skip_examples"].get(reason, [""])[0]
        lines.append(f"  skipped {reason}: {n}   e.g. {first}")
    if report.get("cut_off_kept"):
        lines.append(f"  kept cut off at the engine's token limit (no end-of-turn): {report['cut_off_kept']}")
    if report.get("teacher_fill_logprob") is not None:
        lines.append(
            f"  teacher log-probs: {report['teacher_filled_tokens']} trained tokens filled with "
            f"teacher_fill_logprob={report['teacher_fill_logprob']} (markup the engine did not write); "
            f"{report['stop_logprobs']} of {report['documents']} documents end their turn with the "
            "teacher's recorded log-prob of stopping"
        )
    lines.append(
        f"  {report['rows']} rows x {report['seq_length']} tokens, {report['tokens']} tokens "
        f"({report['loss_tokens']} trained), packing {report.get('packing', '?')}: efficiency "
        f"{report['packing_efficiency']:.3f} ({report.get('padding_tokens', '?')} padding tokens); "
        f"{report['shards']} shards ({report['shards_reused']} reused), {report['seconds']:.1f} s"
    )
    return "\n".join(lines)


def _shard_keys(
    cfg: PrepareConfig, inputs: list[tuple[str, str]], specs: list[ShardSpec], fingerprint: str
) -> list[str]:
    """Each shard's key: what decides its content (see the module docstring)."""
    settings = cfg.content_settings()
    identity = {path: [os.path.abspath(path), input_identity(path)] for path, _ in inputs}
    return [
        _sha(
            {
                "version": STORE_VERSION,
                "settings": settings,
                "tokenizer": fingerprint,
                "input": identity[s.path],
                "range": [s.format, s.start, s.stop, s.byte_start, s.byte_stop, s.split],
            }
        )
        for s in specs
    ]


def _build(
    cfg: PrepareConfig, todo: list[tuple[ShardSpec, str]], tokenizer: TraceTokenizer
) -> dict[int, dict[str, Any]]:
    """Build the shards of ``todo`` (in this process, or in ``cfg.workers`` forked ones): their infos."""
    infos: dict[int, dict[str, Any]] = {}
    if cfg.workers == 1 or len(todo) <= 1:
        for spec, key in todo:
            infos[spec.index] = build_shard(cfg, spec, key, tokenizer)
        return infos
    _WORKER["tokenizer"] = tokenizer  # inherited by forked workers
    try:
        with ProcessPoolExecutor(
            max_workers=min(cfg.workers, len(todo)),
            mp_context=_pool_context(),
            initializer=_init_worker,
            initargs=(cfg,),
        ) as pool:
            futures = [pool.submit(build_shard, cfg, spec, key) for spec, key in todo]
            try:
                for (spec, _), future in zip(todo, futures, strict=True):
                    infos[spec.index] = future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # shards not started are not begun
                raise
    finally:
        _WORKER.pop("tokenizer", None)
    return infos


def run_prepare(cfg: PrepareConfig, quiet: bool = False) -> dict[str, Any]:
    """Build (or finish) the store in ``cfg.out_dir``; return the report (also in report.json).

    Raises:
        DataError: unreadable inputs or tokenizer, ``out_dir`` in the way, a bad record with
            ``on_bad_record=error`` (the message names the file and line), no document kept
            (nothing usable: no manifest is written), or a failed write
            (:class:`~nemo_dcod.data.store.StoreWriteError`: no space, no permission).
    """
    try:
        return _run_prepare(cfg, quiet)
    except OSError as exc:  # reading an input (a write failure is already a StoreWriteError)
        where = exc.filename or cfg.out_dir
        raise DataError(f"{where}: {exc.strerror or exc}: check the file and re-run.") from exc


def _run_prepare(cfg: PrepareConfig, quiet: bool) -> dict[str, Any]:
    start = time.perf_counter()
    out = Path(cfg.out_dir)
    inputs = expand_inputs(cfg.inputs, cfg.format)
    tokenizer = TraceTokenizer(cfg, load_tokenizer(cfg.tokenizer, cfg.chat_template))
    fingerprint = tokenizer_fingerprint(tokenizer.tok)
    specs = plan_shards(inputs, cfg.records_per_shard, cfg.hf_split)
    keys = _shard_keys(cfg, inputs, specs, fingerprint)
    run_key = _sha(keys)
    done = _prepare_out_dir(out, run_key, cfg.overwrite)
    if done is not None:
        if not quiet:
            print(f"prepare: {out} is complete for these inputs and settings; nothing to do.")
        return done
    infos: dict[int, dict[str, Any]] = {}
    todo = []
    for spec, key in zip(specs, keys, strict=True):
        info = _existing_info(cfg, spec, key)
        if info is None:
            todo.append((spec, key))
        else:
            infos[spec.index] = info
    reused = len(infos)
    infos.update(_build(cfg, todo, tokenizer))
    planned = {_shard_name(s.index) for s in specs}
    try:
        for extra in (out / "shards").iterdir():
            if extra.name not in planned:
                shutil.rmtree(extra)  # shards of an earlier plan (more inputs, smaller shards)
    except OSError as exc:
        raise write_error(out / "shards", exc) from exc
    ordered = [infos[s.index] for s in specs]
    report = _report(cfg, ordered, reused, time.perf_counter() - start)
    write_json_atomic(out / "report.json", report)
    if report["documents"] == 0:
        raise _nothing_usable(cfg, inputs, ordered, report)
    write_json_atomic(out / "manifest.json", _manifest(cfg, tokenizer, fingerprint, run_key, ordered, report))
    if not quiet:
        print(format_report(report, cfg.out_dir), file=sys.stdout)
    return report


def _manifest(
    cfg: PrepareConfig,
    tokenizer: TraceTokenizer,
    fingerprint: str,
    run_key: str,
    infos: list[dict[str, Any]],
    report: dict[str, Any],
) -> dict[str, Any]:
    rows, s = report["rows"], cfg.seq_length
    columns: dict[str, Any] = {n: {"dtype": d, "shape": [rows, s]} for n, d in ROW_COLUMNS.items()}
    columns.update(dict.fromkeys(TEACHER_COLUMNS))  # empty until score writes them ...
    if cfg.fields.has_teacher():  # ... except the trace-token log-prob from the generation engine
        columns["teacher_logprobs"] = {"dtype": TEACHER_COLUMNS["teacher_logprobs"], "shape": [rows, s]}
    counts = ("records_read", "records_kept", "documents", "rows", "tokens", "loss_tokens")
    return {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "key": run_key,
        "seq_length": s,
        "pad_token_id": pad_token_id(tokenizer.tok),
        "vocab_size": len(tokenizer.tok),
        "tokenizer": {"path": os.path.abspath(cfg.tokenizer), "fingerprint": fingerprint},
        "teacher": {"logprobs": "generation" if cfg.fields.has_teacher() else None, "topk": 0},
        "columns": columns,
        "counts": {n: report[n] for n in counts} | {"skipped": report["skipped"]},
        "shards": [
            {n: i[n] for n in ("key", "rows", "documents", "tokens", "loss_tokens")}
            | {"name": _shard_name(i["index"])}
            for i in infos
        ],
        "settings": cfg.content_settings(),
    }
