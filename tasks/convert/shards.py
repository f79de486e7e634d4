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
from concurrent.futures import Future, ThreadPoolExecutor
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


@dataclass(frozen=True)
class Placed:
    """A planned tensor and the absolute file offset where its bytes go."""

    tensor: PlannedTensor
    offset: int


class ShardWriter:
    """Creates planned shard files atomically (temp file, fsync, rename), the flush of each finished shard running on
    a background thread while the next one is written, so reading never waits on the disk's write-back.

    At most one shard is flushing at a time, which bounds the dirty pages a conversion leaves behind. A failed flush
    surfaces at the next shard or on exit; temp files never outlive an error.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-flush")
        self._pending: Future[None] | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._wait()
        finally:
            self._pool.shutdown()

    @contextmanager
    def shard(self, shard: Shard) -> Iterator[tuple[int, list[Placed]]]:
        """Yields the new file's descriptor (header already written) and where each tensor's bytes go; the body
        must fill exactly those bytes, in any order, with positional writes."""
        order = file_order(shard)
        header = safetensors_header(order)
        placed, offset = [], len(header)
        for tensor in order:
            placed.append(Placed(tensor, offset))
            offset += tensor.nbytes
        tmp = self.out_dir / f".{shard.file}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, header, 0)
            yield fd, placed
            size = os.fstat(fd).st_size
            if size != offset:
                raise ValueError(f"{shard.file}: wrote {size} bytes, planned {offset}")
            self._wait()
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        self._pending = self._pool.submit(_finish, fd, tmp, self.out_dir / shard.file)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def _finish(fd: int, tmp: Path, target: Path) -> None:
    try:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
