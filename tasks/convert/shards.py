"""Sharded safetensors output: plan shard membership from shapes alone, write each shard as soon as it is filled.

The plan needs only names, shapes and dtypes, so the whole layout (and the ``-of-N`` file names) is fixed before a
single tensor is read. Each shard is written to a temporary name, fsynced and renamed, and the index is written
last: a reader never sees a half-written shard or an index pointing at one.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


# safetensors lays a file's tensors out by dtype (its Rust ``Dtype`` enum, highest first), then by name; the header
# lists them in that order. Following it makes our shards byte-identical to safetensors' own output.
_DTYPE_ORDER = (torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16,
                torch.float16, torch.bfloat16, torch.int32, torch.float32, torch.float64, torch.int64)
_DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
                torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
SHARD_METADATA = {"format": "pt"}  # what transformers' save_pretrained writes; its loaders expect it


def file_order(shard: Shard) -> list[PlannedTensor]:
    unknown = sorted({str(t.dtype) for t in shard.tensors if t.dtype not in _DTYPE_NAMES})
    if unknown:
        raise ValueError(f"{shard.file}: dtype(s) {unknown} have no safetensors name")
    return sorted(shard.tensors, key=lambda t: (-_DTYPE_ORDER.index(t.dtype), t.name.encode()))


def safetensors_header(tensors: Sequence[PlannedTensor]) -> bytes:
    """8-byte little-endian length + the JSON header (compact, space-padded to 8 bytes so the data that follows
    is 8-byte aligned) for ``tensors`` stored back to back in this order."""
    entries: dict[str, object] = {"__metadata__": SHARD_METADATA}
    offset = 0
    for tensor in tensors:
        entries[tensor.name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                                "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


@contextmanager
def open_shard(out_dir: Path, shard: Shard) -> Iterator[tuple[int, list[PlannedTensor]]]:
    """Create ``shard`` atomically: yields the file's descriptor, positioned after the header, and the tensors in
    the order their bytes must be written to it. On exit the file must hold exactly the planned bytes; it is then
    fsynced and renamed into place (on any error the temp file is removed)."""
    order = file_order(shard)
    header = safetensors_header(order)
    with atomic_file(out_dir / shard.file) as handle:
        handle.write(header)
        handle.flush()
        fd = handle.fileno()
        yield fd, order
        written = os.lseek(fd, 0, os.SEEK_CUR)
        if written != len(header) + shard.nbytes:
            raise ValueError(f"{shard.file}: wrote {written} bytes, planned {len(header) + shard.nbytes}")


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
