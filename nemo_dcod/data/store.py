"""The packed sample store: documents packed into fixed-length rows, sharded, memory-mapped.

Layout of a store directory (format ``nemo_dcod.packed_store``, version :data:`STORE_VERSION`)::

    manifest.json            written last, atomically: a store without it is incomplete
    scoring.json             present only while ``score`` writes teacher columns: the store is
                             incomplete until that run (or its resumption) finishes
    report.json              what prepare read, kept, skipped (by reason), packed
    shards/shard_00000/      one per input range; written to a temp dir, then renamed
        tokens.npy           [R, S] int32   token ids, documents back to back, then padding
        loss_mask.npy        [R, S] uint8   1 where the *label* (the next token) is trained
        segment_ids.npy      [R, S] int32   document number within the row; -1 on padding
        teacher_logprobs.npy [R, S] float32 teacher log p of the label (only with teacher columns)
        teacher_topk_ids.npy, teacher_topk_logprobs.npy  [R, S, K] (written by ``score``)
        documents.npy        [D, 4] int64   (row, start, length, record index in its input)
        shard.json           the shard's key (inputs + settings + tokenizer), counts, skips
        score.json           written by ``score`` after the shard's teacher columns: their key

Every per-position column is aligned to the label, as the loss reads it: position ``t`` of a
document holds token ``t`` as input and token ``t + 1`` as label. The last position of each
document has loss mask 0 and label ``pad_token_id``: a document's first token is never predicted
from the previous document. ``labels`` and ``position_ids`` (restarting at 0 per document and for
the padding run) are derived from ``tokens`` and ``segment_ids`` when a row is read.

**Attention mask.** :class:`PackedStore` returns none: a dense ``[S, S]`` mask per sample is
``S²`` bytes (64 MiB at S = 8192). :func:`collate_packed` adds the block-diagonal causal mask
``[B, 1, S, S]`` (Megatron's convention: True = masked out) for the local attention
implementation; fused attention (Transformer Engine) should instead take the document lengths
from :func:`cu_seqlens` (``PackedSeqParams``, THD layout).
"""

from __future__ import annotations

import bisect
import errno
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nemo_dcod.data.readers import POSITIVE_LOGPROB_TOLERANCE, DataError
from nemo_dcod.data.tokenize import Document

__all__ = [
    "SCORING_MARKER",
    "STORE_FORMAT",
    "STORE_VERSION",
    "BadTeacherValueError",
    "IncompleteStoreError",
    "PackedShard",
    "PackedStore",
    "StoreWriteError",
    "block_causal_attention_mask",
    "collate_packed",
    "cu_seqlens",
    "first_bad_logprob",
    "pack_documents",
    "read_manifest",
    "write_error",
    "write_json_atomic",
    "write_shard",
]

STORE_FORMAT = "nemo_dcod.packed_store"
STORE_VERSION = 1
SCORING_MARKER = "scoring.json"
"""In the store's root while ``nemo-dcod score`` rewrites teacher columns (see :func:`read_manifest`)."""
ROW_COLUMNS = {"tokens": "int32", "loss_mask": "uint8", "segment_ids": "int32"}
TEACHER_COLUMNS = {
    "teacher_logprobs": "float32",
    "teacher_topk_ids": "int32",
    "teacher_topk_logprobs": "float32",
}


class IncompleteStoreError(DataError):
    """The store was not finished (no manifest), does not match its manifest, or holds no rows."""


class BadTeacherValueError(DataError):
    """A stored teacher log-prob at a trained position is NaN, ±inf or positive (the file was
    changed after it was written, or a value slipped through): the message names the shard's
    column file, the row and the position."""


class StoreWriteError(DataError):
    """Writing the store failed (no space left, no permission, ...): nothing was made to look complete."""


_WRITE_HINTS = {
    errno.ENOSPC: "no space left on the device: free space or choose another out_dir, then re-run "
    "(finished shards are kept)",
    errno.EDQUOT: "disk quota exceeded: free space or choose another out_dir, then re-run",
    errno.EACCES: "no permission to write there: choose an out_dir you can write to",
    errno.EPERM: "no permission to write there: choose an out_dir you can write to",
    errno.EROFS: "a read-only file system: choose an out_dir on a writable one",
}


def write_error(path: Path, exc: OSError) -> StoreWriteError:
    """The :class:`StoreWriteError` of ``exc`` raised while writing ``path``: what failed and what to do."""
    reason = exc.strerror or str(exc)
    name = errno.errorcode.get(exc.errno or -1, "")
    hint = _WRITE_HINTS.get(exc.errno or -1, "check the out_dir's file system, then re-run")
    return StoreWriteError(f"{path}: cannot write ({reason}{', ' + name if name else ''}): {hint}.")


@dataclass
class PackedShard:
    """Packed rows of one shard.

    Attributes:
        columns: ``{name: [R, S] array}`` (see the module docstring).
        documents: ``[D, 4]`` int64 ``(row, start, length, record index)``.
    """

    columns: dict[str, np.ndarray]
    documents: np.ndarray

    @property
    def rows(self) -> int:
        return int(self.columns["tokens"].shape[0])


def _assign_rows(lengths: Sequence[int], seq_length: int, policy: str) -> list[list[int]]:
    """Documents per row. best_fit: longest first, each into the fullest row it fits (O(D log R));
    sequential: in order, a new row when the next does not fit; none: one per row."""
    rows: list[list[int]] = []
    if policy == "none":
        return [[i] for i in range(len(lengths))]
    if policy == "sequential":
        room = 0
        for i, n in enumerate(lengths):
            if not rows or n > room:
                rows.append([])
                room = seq_length
            rows[-1].append(i)
            room -= n
        return rows
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the first that fits is the fullest
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = seq_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return rows


def pack_documents(
    documents: Sequence[Document],
    seq_length: int,
    pad_token_id: int,
    policy: str = "best_fit",
    teacher: bool | None = None,
) -> PackedShard:
    """Pack documents into ``[R, seq_length]`` rows, boundaries kept (see the module docstring).

    Args:
        documents: each at most ``seq_length`` tokens.
        seq_length: tokens per row.
        pad_token_id: token of padding positions and label of each document's last position.
        policy: best_fit | sequential | none.
        teacher: write the ``teacher_logprobs`` column (``[0, S]`` when no document is left, so a
            shard whose records were all skipped still has every column the store lists); None:
            when the documents carry teacher log-probs.
    """
    lengths = [len(d.tokens) for d in documents]
    assert all(0 < n <= seq_length for n in lengths), "documents must be cut to seq_length first"
    assignment = _assign_rows(lengths, seq_length, policy)
    rows = len(assignment)
    tokens = np.full((rows, seq_length), pad_token_id, dtype=np.int32)
    loss_mask = np.zeros((rows, seq_length), dtype=np.uint8)
    segment_ids = np.full((rows, seq_length), -1, dtype=np.int32)
    if teacher is None:
        teacher = bool(documents) and documents[0].teacher_logprobs is not None
    teacher_lp = np.zeros((rows, seq_length), dtype=np.float32) if teacher else None
    placed = np.zeros((len(documents), 4), dtype=np.int64)
    for r, members in enumerate(assignment):
        start = 0
        for seg, i in enumerate(members):
            doc, n = documents[i], lengths[i]
            tokens[r, start : start + n] = doc.tokens
            segment_ids[r, start : start + n] = seg
            # Label alignment: position t is trained when token t + 1 is; the last position is not.
            loss_mask[r, start : start + n - 1] = doc.trained[1:]
            if teacher_lp is not None:
                assert doc.teacher_logprobs is not None
                teacher_lp[r, start : start + n - 1] = doc.teacher_logprobs[1:]
            placed[i] = (r, start, n, doc.index)
            start += n
    columns: dict[str, np.ndarray] = {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids}
    if teacher_lp is not None:
        columns["teacher_logprobs"] = teacher_lp
    return PackedShard(columns, placed)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file in the same directory, then rename over ``path``.

    Raises:
        StoreWriteError: the write failed (no space, no permission); ``path`` is as it was.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # ENOSPC, EACCES, EROFS: the old file (if any) is untouched
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from exc


def write_shard(final: Path, shard: PackedShard, info: dict[str, Any]) -> None:
    """Write a shard into a temp directory beside ``final``, then rename it into place.

    A process killed mid-write leaves only the ``.tmp-*`` directory, which is never read and is
    removed by the next run; ``final`` either does not exist or is whole.

    Raises:
        StoreWriteError: a write failed (no space left, no permission); the temp dir is removed.
    """
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        for name, array in shard.columns.items():
            np.save(tmp / f"{name}.npy", array)
        np.save(tmp / "documents.npy", shard.documents)
        (tmp / "shard.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError as exc:  # the partial temp dir is removed (it may hold what filled the disk)
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(final, exc) from exc


def read_manifest(path: str | Path, *, scoring: bool = False) -> dict[str, Any]:
    """The store's manifest.

    Args:
        path: the store directory.
        scoring: accept a store whose teacher columns ``score`` is rewriting (:data:`SCORING_MARKER`
            present): only ``score`` itself reads it so, to resume.

    Raises:
        IncompleteStoreError: no manifest (prepare did not finish), another format/version, or a
            scoring run that did not finish (some shards may hold the new columns, some the old).
    """
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.is_file():
        raise IncompleteStoreError(
            f"{path}: not a complete store (no manifest.json): prepare did not finish; re-run it to resume."
        )
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except ValueError as exc:  # not JSON (or not UTF-8): written by something else, or damaged
        raise IncompleteStoreError(f"{manifest_path}: not a manifest ({exc}): re-run prepare.") from exc
    if not isinstance(manifest, dict):
        raise IncompleteStoreError(f"{manifest_path}: not a manifest (not a JSON object): re-run prepare.")
    if manifest.get("format") != STORE_FORMAT or manifest.get("version") != STORE_VERSION:
        raise IncompleteStoreError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; this code reads "
            f"{STORE_FORMAT!r} version {STORE_VERSION}: re-run prepare."
        )
    marker = Path(path) / SCORING_MARKER
    if not scoring and marker.is_file():
        raise IncompleteStoreError(
            f"{path}: `nemo-dcod score` did not finish writing its teacher columns ({marker} is there, "
            "with that run's config), so shards may disagree: re-run it with the same config to resume."
        )
    return manifest


class PackedStore(Dataset[dict[str, torch.Tensor]]):
    """Rows of a complete store, in the batch format training consumes.

    Each item: ``tokens``, ``labels``, ``position_ids``, ``segment_ids`` (int64 ``[S]``),
    ``loss_mask`` (float32 ``[S]``), and when the store has them ``teacher_logprobs`` (``[S]``),
    ``teacher_topk_ids`` (int64 ``[S, K]``), ``teacher_topk_logprobs`` (``[S, K]``). No attention
    mask: see :func:`collate_packed`. Shards are memory-mapped when first read (after a DataLoader
    worker forks, not before).

    Args:
        path: the store directory.
        columns: read only these (e.g. ``tokens``, ``loss_mask``, ``segment_ids`` to score rows);
            None: every column the manifest lists.
        scoring: open a store that ``score`` is rewriting (see :func:`read_manifest`).

    Raises:
        IncompleteStoreError: no manifest, unfinished scoring, or a shard missing or not matching
            the manifest.
    """

    def __init__(self, path: str | Path, columns: Sequence[str] | None = None, scoring: bool = False) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path, scoring=scoring)
        self.seq_length = int(self.manifest["seq_length"])
        self.pad_token_id = int(self.manifest["pad_token_id"])
        listed = [name for name, spec in self.manifest["columns"].items() if spec is not None]
        self.columns = listed if columns is None else [name for name in listed if name in columns]
        self.shards = [s["name"] for s in self.manifest["shards"]]
        rows = [int(s["rows"]) for s in self.manifest["shards"]]
        self.offsets = np.cumsum([0, *rows])
        if not rows or self.offsets[-1] == 0:  # written so by an older prepare, or by hand
            raise IncompleteStoreError(
                f"{path}: the store holds no rows (prepare kept no document; see its report.json): "
                "re-run prepare with inputs that yield records."
            )
        for shard, n_rows in zip(self.manifest["shards"], rows, strict=True):
            self._check_shard(shard, n_rows)
        self._open: dict[int, dict[str, np.ndarray]] = {}

    def _check_shard(self, shard: dict[str, Any], rows: int) -> None:
        where = self.path / "shards" / shard["name"]
        info_path = where / "shard.json"
        if not info_path.is_file() or json.loads(info_path.read_text()).get("key") != shard["key"]:
            raise IncompleteStoreError(
                f"{where}: missing or not the shard the manifest lists: re-run prepare."
            )
        for name in self.columns:
            spec = self.manifest["columns"][name]
            try:
                array = np.load(where / f"{name}.npy", mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise IncompleteStoreError(
                    f"{where}/{name}.npy: unreadable ({exc}): re-run prepare."
                ) from exc
            if array.shape != (rows, *spec["shape"][1:]) or str(array.dtype) != spec["dtype"]:
                raise IncompleteStoreError(
                    f"{where}/{name}.npy: shape {array.shape} {array.dtype}, manifest says "
                    f"({rows}, {', '.join(map(str, spec['shape'][1:]))}) {spec['dtype']}: re-run prepare."
                )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._open:
            where = self.path / "shards" / self.shards[k]
            self._open[k] = {n: np.load(where / f"{n}.npy", mmap_mode="r") for n in self.columns}
        return self._open[k]

    def shard_column(self, k: int, name: str) -> np.ndarray:
        """Column ``name`` of the ``k``-th shard, memory-mapped: ``[R_k, S]`` (or ``[R_k, S, K]``)."""
        return self._shard(k)[name]

    def row(self, index: int) -> dict[str, np.ndarray]:
        """The stored columns of row ``index`` (numpy, label-aligned).

        Teacher log-probs read are checked at the row's trained positions (every position when
        ``loss_mask`` is not read): finite and <= 0 (see :func:`first_bad_logprob`).

        Raises:
            BadTeacherValueError: naming the shard's column file, the row and the position.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a store with {len(self)} rows")
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        local = index - int(self.offsets[k])
        cols = {name: np.asarray(a[local]) for name, a in self._shard(k).items()}
        trained = cols["loss_mask"] > 0 if "loss_mask" in cols else None
        for name in ("teacher_logprobs", "teacher_topk_logprobs"):
            if name in cols and (bad := first_bad_logprob(cols[name], trained)) is not None:
                (position, *entry), value = bad
                where = f"position {position}" + (f", top-k entry {entry[0]}" if entry else "")
                raise BadTeacherValueError(
                    f"{self.path / 'shards' / self.shards[k] / name}.npy: row {local} (store row "
                    f"{index}), {where}: {value!r} at a trained position; a teacher "
                    "log-prob must be finite and <= 0. The file was changed after it was written, or "
                    "a bad value slipped through: re-run prepare (engine log-probs) or score (scored "
                    "columns) into a fresh out_dir."
                )
        return cols

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        cols = self.row(int(index))
        tokens = cols["tokens"].astype(np.int64)
        seg = cols["segment_ids"].astype(np.int64)
        s = len(tokens)
        same_next = np.zeros(s, dtype=bool)
        same_next[:-1] = seg[1:] == seg[:-1]
        labels = np.where(same_next & (seg >= 0), np.roll(tokens, -1), self.pad_token_id)
        first = np.ones(s, dtype=bool)
        first[1:] = seg[1:] != seg[:-1]
        arange = np.arange(s)
        position_ids = arange - np.maximum.accumulate(np.where(first, arange, 0))
        sample = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "position_ids": torch.from_numpy(position_ids.astype(np.int64)),
            "loss_mask": torch.from_numpy(cols["loss_mask"].astype(np.float32)),
            "segment_ids": torch.from_numpy(seg),
        }
        for name in ("teacher_logprobs", "teacher_topk_logprobs"):
            if name in cols:
                sample[name] = torch.from_numpy(cols[name].astype(np.float32))
        if "teacher_topk_ids" in cols:
            sample["teacher_topk_ids"] = torch.from_numpy(cols["teacher_topk_ids"].astype(np.int64))
        return sample


def first_bad_logprob(
    values: np.ndarray, trained: np.ndarray | None = None
) -> tuple[tuple[int, ...], float] | None:
    """The first value that is no log-probability (NaN, ±inf, > :data:`POSITIVE_LOGPROB_TOLERANCE`)
    at a trained position: ``(index, value)``, or None when all are.

    Args:
        values: ``[..., S]`` (``teacher_logprobs``) or ``[..., S, K]`` (``teacher_topk_logprobs``).
        trained: bool, ``values.shape`` without ``K``: positions checked; None: all of them.
    """
    ok = np.isfinite(values) & (values <= POSITIVE_LOGPROB_TOLERANCE)  # NaN fails both
    if trained is not None:
        ok |= ~(trained[..., None] if ok.ndim > trained.ndim else trained)
    if ok.all():
        return None
    at = np.unravel_index(int(np.argmin(ok)), ok.shape)
    return tuple(int(i) for i in at), float(values[at])


def block_causal_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, S, S]`` bool, True = masked out (Megatron's convention): a token sees only earlier
    tokens of its own document (padding, segment -1, sees only padding).

    Args:
        segment_ids: ``[B, S]`` document number per position.
    """
    s = segment_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return ~(same & causal)[:, None]


def cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """int32 cumulative document lengths over the flattened ``[B * S]`` tokens (THD layout): each
    document and each padding run is one sequence; rows never share one.

    Args:
        segment_ids: ``[B, S]`` document number per position.
    """
    b, s = segment_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    positions = torch.nonzero(starts.reshape(-1))[:, 0]
    end = torch.tensor([b * s], device=segment_ids.device)
    return torch.cat([positions, end]).to(torch.int32)


def collate_packed(
    samples: Sequence[dict[str, torch.Tensor]], attention_mask: bool = False
) -> dict[str, torch.Tensor]:
    """Stack :class:`PackedStore` items into ``[B, S]`` (``[B, S, K]``) tensors; with
    ``attention_mask``, add the ``[B, 1, S, S]`` block-diagonal causal mask."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    if attention_mask:
        batch["attention_mask"] = block_causal_attention_mask(batch["segment_ids"])
    return batch
