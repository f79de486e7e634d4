"""Sharded safetensors output: plan shard membership from shapes alone, write each shard as soon as it is filled.

The plan needs only names, shapes and dtypes, so the whole layout (and the ``-of-N`` file names) is fixed before a
single tensor is read. Each shard is written to a temporary name, fsynced and renamed, and the index is written
last: a reader never sees a half-written shard or an index pointing at one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.store import atomic_file
from tasks.convert.sources import INDEX_NAME

# Decimal units as in transformers' max_shard_size ("5GB" = 5 * 10**9 bytes).
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB)\s*$")


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"size {text!r} must look like 5GB, 500MB, 1024KB or 100B")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for size in self.shape:
            n *= size
        return n


@dataclass(frozen=True)
class Shard:
    file: str
    tensors: tuple[PlannedTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[Shard]:
    """Greedy in the given order; a tensor larger than the limit gets a shard of its own."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max shard size must be positive, got {max_shard_bytes}")
    groups: list[list[PlannedTensor]] = []
    current: list[PlannedTensor] = []
    size = 0
    for tensor in tensors:
        if current and size + tensor.nbytes > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(tensor)
        size += tensor.nbytes
    if current:
        groups.append(current)
    total = len(groups)
    return [Shard(f"model-{i:05d}-of-{total:05d}.safetensors", tuple(g)) for i, g in enumerate(groups, 1)]


def write_shard(out_dir: Path, shard: Shard, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write one planned shard atomically; the tensors must match the plan exactly (names, shapes, dtypes)."""
    from safetensors.torch import save_file

    planned = {t.name: t for t in shard.tensors}
    if set(tensors) != set(planned):
        raise ValueError(f"{shard.file}: got tensors {sorted(set(tensors) ^ set(planned))[:5]} outside the plan")
    for name, tensor in tensors.items():
        want = planned[name]
        if tuple(tensor.shape) != want.shape or tensor.dtype != want.dtype:
            raise ValueError(f"{shard.file}: {name} is {tuple(tensor.shape)} {tensor.dtype}, planned {want.shape} "
                             f"{want.dtype}")
    target = out_dir / shard.file
    tmp = out_dir / f".{shard.file}.tmp"
    try:
        # Zero-copy: safetensors writes straight from the tensors' memory (contiguous CPU tensors only).
        ordered = {t.name: tensors[t.name].contiguous().cpu() for t in shard.tensors}
        save_file(ordered, tmp, metadata={"format": "pt"})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def write_index(out_dir: Path, shards: Sequence[Shard]) -> Path:
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {t.name: s.file for s in shards for t in s.tensors},
    }
    path = out_dir / INDEX_NAME
    with atomic_file(path, "w") as handle:
        json.dump(index, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return path
