"""Packed training data: the packing algorithm and the on-disk format (numpy only; the torch Dataset that
reads it for training is finetune/packed_dataset.py, so packing and cache checks never import torch).

Layout of a pack artifact (one directory per split, ``meta.json`` written last)::

    meta.json                 {"format": "finetune-packed", "version": 1, "max_seq_len", "pad_id", "splits": {...}}
    <split>/tokens.npy        int32 [num_packs, max_seq_len]   documents back to back, pad_id after the last one
    <split>/labels.npy        int32 [num_packs, max_seq_len]   token ids to learn, -100 elsewhere (prompt, pad)
    <split>/seq_lens.npy      int32 [num_documents]            document lengths, pack after pack
    <split>/pack_offsets.npy  int64 [num_packs + 1]            pack i's documents are seq_lens[off[i]:off[i+1]]

Labels are not shifted (torchtune recipes shift them). The label of every document's first token is -100: after
the shift it would be the target of the previous document's last token, a prediction across documents.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left, insort
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.store import atomic_file

FORMAT = "finetune-packed"
VERSION = 1
META = "meta.json"
IGNORE_INDEX = -100  # torchtune's CROSS_ENTROPY_IGNORE_IDX
ARRAYS = ("tokens", "labels", "seq_lens", "pack_offsets")
_SCATTER_TOKENS = 1 << 18


def assign_packs(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Best-fit decreasing bin packing: the pack index of every document (packs numbered by first document).

    Documents are placed longest first, each into the fullest pack it still fits. Instead of one step per
    document this works on groups of equal length: a pack with room r takes r // length documents of that length
    in a row (best fit keeps choosing it while it has room), so a whole group lands in a few numpy slices and the
    Python loop runs per (length, room) pair, not per document.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    count = lengths.size
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if lengths.min() < 1 or lengths.max() > capacity:
        raise ValueError(f"document lengths must lie in [1, {capacity}], got [{lengths.min()}, {lengths.max()}]")
    order = np.argsort(-lengths, kind="stable")
    ranked = lengths[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    sizes = np.diff(np.r_[starts, count])

    rooms: list[int] = []  # sorted remaining capacities that have open packs
    packs_by_room: dict[int, list[np.ndarray]] = {}
    pack_of_ranked = np.empty(count, dtype=np.int64)
    opened = 0

    def put(room: int, ids: np.ndarray) -> None:
        if room == 0 or ids.size == 0:
            return  # a full pack takes nothing more
        if room not in packs_by_room:
            insort(rooms, room)
            packs_by_room[room] = []
        packs_by_room[room].append(ids)

    def take(room: int, wanted: int) -> np.ndarray:
        ids = np.concatenate(packs_by_room[room])
        if wanted >= ids.size:
            del packs_by_room[room]
            rooms.remove(room)
            return ids
        packs_by_room[room] = [ids[wanted:]]
        return ids[:wanted]

    for length, start, left in zip(ranked[starts].tolist(), starts.tolist(), sizes.tolist()):
        while left:
            slot = bisect_left(rooms, length)
            room = rooms[slot] if slot < len(rooms) else capacity
            per_pack = room // length
            wanted = -(-left // per_pack)
            if slot < len(rooms):
                ids = take(room, wanted)
            else:
                ids = np.arange(opened, opened + wanted)
                opened += wanted
            placed = min(left, ids.size * per_pack)
            pack_of_ranked[start:start + placed] = np.repeat(ids, per_pack)[:placed]
            full, rest = divmod(placed, per_pack)
            put(room - per_pack * length, ids[:full])
            if rest:
                put(room - rest * length, ids[full:full + 1])
            start += placed
            left -= placed

    pack_of_doc = np.empty(count, dtype=np.int64)
    pack_of_doc[order] = pack_of_ranked
    # Number packs by their first document so pack order follows the data's order.
    _, first_doc = np.unique(pack_of_doc, return_index=True)
    renumber = np.empty(opened, dtype=np.int64)
    renumber[np.argsort(first_doc, kind="stable")] = np.arange(opened)
    return renumber[pack_of_doc]


@dataclass
class PackedSplit:
    tokens: np.ndarray
    labels: np.ndarray
    seq_lens: np.ndarray
    pack_offsets: np.ndarray
    doc_order: np.ndarray
    """Source index of each document in seq_lens order (kept in memory for checks and stats, not written)."""

    @property
    def max_seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def stats(self) -> dict[str, Any]:
        packs, slots = int(self.tokens.shape[0]), int(self.tokens.size)
        used = int(self.seq_lens.sum())
        return {
            "documents": int(self.seq_lens.size),
            "packs": packs,
            "tokens": used,
            "trainable_tokens": int(np.count_nonzero(self.labels != IGNORE_INDEX)),
            "slots": slots,
            "density": round(used / slots, 6) if slots else 0.0,
            "padding_fraction": round(1 - used / slots, 6) if slots else 0.0,
            "docs_per_pack": round(self.seq_lens.size / packs, 3) if packs else 0.0,
        }


def build_packs(
    tokens: np.ndarray, labels: np.ndarray, lengths: np.ndarray, max_seq_len: int, pad_id: int
) -> PackedSplit:
    """Pack documents given back to back in ``tokens``/``labels`` (lengths in ``lengths``) into fixed-size rows.

    Every token is moved by one vectorised scatter: a token's row-major destination is its document's destination
    start plus its offset inside the document.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if tokens.shape != labels.shape or tokens.size != lengths.sum():
        raise ValueError(f"tokens {tokens.shape}, labels {labels.shape} and lengths (sum {lengths.sum()}) disagree")
    pack_of_doc = assign_packs(lengths, max_seq_len)
    num_packs = int(pack_of_doc.max()) + 1 if lengths.size else 0
    doc_order = np.lexsort((np.arange(lengths.size), pack_of_doc))  # by pack, source order inside a pack
    ordered = lengths[doc_order]
    pack_offsets = np.zeros(num_packs + 1, dtype=np.int64)
    np.cumsum(np.bincount(pack_of_doc, minlength=num_packs), out=pack_offsets[1:])

    begin = np.cumsum(ordered) - ordered  # start of each document if all packs were one row
    in_pack = begin - np.repeat(begin[pack_offsets[:-1]], np.diff(pack_offsets))
    destination = pack_of_doc[doc_order] * max_seq_len + in_pack
    shift = np.empty(lengths.size, dtype=np.int64)
    shift[doc_order] = destination - (np.cumsum(lengths) - lengths)[doc_order]
    out_tokens = np.full(num_packs * max_seq_len, pad_id, dtype=np.int32)
    out_labels = np.full(num_packs * max_seq_len, IGNORE_INDEX, dtype=np.int32)
    _scatter_documents(lengths, shift, (tokens, out_tokens), (labels, out_labels))
    out_labels[destination] = IGNORE_INDEX  # no document predicts another's first token
    return PackedSplit(
        tokens=out_tokens.reshape(num_packs, max_seq_len),
        labels=out_labels.reshape(num_packs, max_seq_len),
        seq_lens=ordered.astype(np.int32),
        pack_offsets=pack_offsets,
        doc_order=doc_order,
    )


def _scatter_documents(lengths: np.ndarray, shift: np.ndarray, *pairs: tuple[np.ndarray, np.ndarray]) -> None:
    """``out[shift[d] + i] = values[i]`` for every token i of document d, for each (values, out) pair.

    Runs over a few hundred thousand tokens at a time: the index temporaries stay small and warm instead of
    costing fresh pages for every token (a measured 5x on a 60M-token corpus).
    """
    if lengths.size == 0:
        return
    ends = np.cumsum(lengths)
    cuts = np.searchsorted(ends, np.arange(_SCATTER_TOKENS, ends[-1], _SCATTER_TOKENS), side="right")
    bounds = np.unique(np.r_[0, cuts, lengths.size])
    for first, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        begin, end = int(ends[first - 1]) if first else 0, int(ends[stop - 1])
        target = np.repeat(shift[first:stop], lengths[first:stop])
        target += np.arange(begin, end, dtype=np.int64)
        for values, out in pairs:
            out[target] = values[begin:end]


def write_split(root: Path, split: str, packed: PackedSplit) -> None:
    """Write one split's arrays, each atomically (``meta.json`` goes last, via write_meta)."""
    for name in ARRAYS:
        with atomic_file(Path(root) / split / f"{name}.npy", "wb") as handle:
            np.save(handle, getattr(packed, name), allow_pickle=False)


def write_meta(root: Path, max_seq_len: int, pad_id: int, splits: dict[str, dict[str, Any]],
               extra: dict[str, Any] | None = None) -> None:
    meta = {"format": FORMAT, "version": VERSION, "max_seq_len": max_seq_len, "pad_id": pad_id,
            "splits": splits, **(extra or {})}
    with atomic_file(Path(root) / META, "w") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)


def read_meta(root: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(root) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {root} is not a finished pack artifact") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: format {meta.get('format')!r} v{meta.get('version')}, expected {FORMAT} v{VERSION}")
    return meta


@dataclass(frozen=True)
class StoredSplit:
    """One split of a pack artifact, its arrays memory-mapped (nothing is read until indexed)."""

    path: Path
    split: str
    max_seq_len: int
    pad_id: int
    tokens: np.ndarray
    labels: np.ndarray
    seq_lens: np.ndarray
    pack_offsets: np.ndarray


def open_split(path: str | os.PathLike[str], split: str) -> StoredSplit:
    """The arrays of ``split`` in the pack artifact at ``path``; errors name the directory and what is wrong."""
    meta = read_meta(path)
    if split not in meta["splits"]:
        raise KeyError(f"{path} has no split {split!r}; it has {', '.join(sorted(meta['splits']))}")
    root = Path(path)
    arrays = (np.load(root / split / f"{name}.npy", mmap_mode="r") for name in ARRAYS)
    return StoredSplit(root, split, int(meta["max_seq_len"]), int(meta["pad_id"]), *arrays)
