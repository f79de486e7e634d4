"""Readers that list a checkpoint's tensors without loading them, then load chosen tensors on demand.

Two layouts: torch Distributed Checkpoint (DCP: ``.metadata`` plus ``*.distcp`` files) and safetensors shards
(with or without ``model.safetensors.index.json``). Both load only the keys asked for, so a converter can walk a
checkpoint far larger than memory one group of tensors at a time. Both also tell where a tensor's raw bytes lie in
their files (``byte_ranges``), so a converter can copy or cast them without decoding the tensor into memory.

DCP's ``.metadata`` is a pickle: it is read with llama4tune/checkpoint_pickle.py's unpickler, which only admits DCP's
own metadata classes, so a crafted checkpoint cannot run code. Tensor payloads are located by
tasks/convert/torchsave.py (which executes nothing from the archive), or, when a payload is not plain bytes, read by
DCP with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from llama4tune.checkpoint_pickle import SafeFileSystemReader, UnsafeCheckpointError, load_dcp
from llama4tune.checkpoint_pickle import read_dcp_metadata as read_metadata_file
from finetune.stage import PermanentError
from tunerecipes.checkpoint_layout import METADATA

INDEX_NAME = "model.safetensors.index.json"
# Weights must be one of these; anything else (int, fp8, bool) is the wrong checkpoint or a corrupt header.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        return self.numel * (dtype or self.dtype).itemsize


@dataclass(frozen=True)
class ByteRange:
    """``length`` bytes at ``offset`` of ``path``: (part of) a tensor's little-endian, row-major data."""

    path: Path
    offset: int
    length: int


class TensorSource(Protocol):
    """A checkpoint whose tensors can be listed cheaply and loaded a few at a time."""

    location: Path

    def tensors(self) -> dict[str, TensorInfo]: ...

    def load(self, keys: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors named by ``keys``, each converted to ``dtype``."""
        ...

    def byte_ranges(self, key: str) -> list[ByteRange] | None:
        """The file ranges whose concatenation is the tensor's data in its stored dtype; None when the stored form
        is not plain bytes (then ``load`` it)."""
        ...


def check_float(key: str, info: TensorInfo, where: Path) -> None:
    if info.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise PermanentError(
            f"{where}: tensor {key!r} has dtype {str(info.dtype).removeprefix('torch.')}; "
            f"model weights must be one of {names}"
        )


# -- DCP ---------------------------------------------------------------------------------------------------------

def read_dcp_metadata(path: Path) -> Any:
    """The DCP ``Metadata`` of checkpoint directory ``path``, unpickled with the allow-list."""
    meta_file = path / METADATA
    if not meta_file.is_file():
        raise PermanentError(f"{path}: no {METADATA} file; not a complete DCP checkpoint (interrupted save?)")
    try:
        return read_metadata_file(meta_file)
    except UnsafeCheckpointError as exc:
        raise PermanentError(str(exc)) from exc


class DcpSource:
    """Single-process reader of a DCP checkpoint (no process group needed)."""

    def __init__(self, location: Path) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.location = Path(location)
        self.metadata = read_dcp_metadata(self.location)
        self._tensors = {
            key: TensorInfo(tuple(md.size), md.properties.dtype)
            for key, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }
        self._check_files()
        self._reader = SafeFileSystemReader(self.location, self.metadata)
        # Non-tensor values (offset None) are never loaded here, but they may be stored beside the weights.
        self._stored = {(index.fqn, tuple(index.offset or ())): info
                        for index, info in self.metadata.storage_data.items()}

    def _check_files(self) -> None:
        """Every data file the metadata points at must exist and be long enough: fail before any work."""
        needed: dict[str, int] = {}
        for info in (self.metadata.storage_data or {}).values():
            end = info.offset + info.length
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        for name, end in sorted(needed.items()):
            file = self.location / name
            if not file.is_file():
                raise PermanentError(f"{file}: DCP data file listed in {METADATA} is missing")
            if file.stat().st_size < end:
                raise PermanentError(
                    f"{file}: DCP data file is truncated ({file.stat().st_size} bytes, {METADATA} needs {end})")

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._tensors)

    def byte_ranges(self, key: str) -> list[ByteRange] | None:
        """Raw bytes of an unsharded tensor, or of one sharded in row blocks (FSDP's dim-0 shards), in order."""
        from tasks.convert.torchsave import raw_tensor_offset

        info = self._tensors[key]
        chunks = _row_blocks(info.shape, self.metadata.state_dict_metadata[key].chunks)
        if chunks is None:
            return None
        ranges = []
        for offsets, sizes in chunks:
            stored = self._stored.get((key, offsets))
            if stored is None or stored.transform_descriptors:
                return None
            path = self.location / stored.relative_path
            with open(path, "rb") as handle:
                start = raw_tensor_offset(handle, stored.offset, stored.length, info.dtype, sizes)
            if start is None:
                return None
            ranges.append(ByteRange(path, start, TensorInfo(sizes, info.dtype).nbytes()))
        return ranges

    def load(self, keys: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint import CheckpointException

        # DCP copies each stored tensor into these buffers (copy_ casts), so only one source-dtype tensor is
        # alive beside the requested ones at any moment.
        state = {key: torch.empty(self._tensors[key].shape, dtype=dtype) for key in keys}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            try:
                load_dcp(state, self.location, no_dist=True, reader=self._reader)
            except (UnsafeCheckpointError, CheckpointException) as exc:
                raise PermanentError(f"{self.location}: cannot read tensor(s) {list(keys)[:3]}: {exc}") from exc
        return state


def _row_blocks(shape: tuple[int, ...], chunks: Sequence[Any]) -> list[tuple[tuple[int, ...], tuple[int, ...]]] | None:
    """(offsets, sizes) of the non-empty chunks in order when they tile ``shape`` as whole-row blocks along dim 0
    (so their bytes concatenate to the tensor's); None for any other sharding."""
    blocks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in chunks if TensorInfo(tuple(c.sizes), torch.uint8).numel)
    if not shape:
        return blocks if blocks == [((), ())] else None
    if TensorInfo(shape, torch.uint8).numel == 0:
        return []
    row = 0
    for offsets, sizes in blocks:
        if len(sizes) != len(shape) or offsets[0] != row or any(offsets[1:]) or sizes[1:] != shape[1:]:
            return None
        row += sizes[0]
    return blocks if row == shape[0] else None


# -- safetensors -------------------------------------------------------------------------------------------------

class SafetensorsSource:
    """A directory of safetensors shards: the index's weight map if present, else every ``*.safetensors`` file."""

    def __init__(self, location: Path, skip: Iterable[str] = ()) -> None:
        from safetensors import safe_open

        self.location = Path(location)
        self._files = self._weight_files(set(skip))
        self._where: dict[str, str] = {}
        self._tensors: dict[str, TensorInfo] = {}
        self._ranges: dict[str, ByteRange] = {}
        for name, expected in self._files.items():
            try:
                with safe_open(self.location / name, framework="pt") as handle:
                    keys = set(handle.keys())
                    for key in sorted(keys):
                        piece = handle.get_slice(key)
                        self._tensors[key] = TensorInfo(tuple(piece.get_shape()), _safetensors_dtype(piece.get_dtype()))
                        self._where[key] = name
                # safe_open validated the header (offsets cover the data exactly); record where each tensor lies.
                self._ranges.update(_data_ranges(self.location / name))
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise PermanentError(f"{self.location / name}: not a readable safetensors file: {exc}") from exc
            missing = sorted(expected - keys)
            if missing:
                raise PermanentError(
                    f"{self.location / name}: lacks tensor(s) {missing[:5]} that {INDEX_NAME} places in it")

    def _weight_files(self, skip: set[str]) -> dict[str, set[str]]:
        """Shard file name -> keys the index says it holds (empty when there is no index)."""
        index = self.location / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise PermanentError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {exc}") from exc
            files: dict[str, set[str]] = {}
            for key, name in weight_map.items():
                files.setdefault(name, set()).add(key)
            for name in sorted(files):
                if not (self.location / name).is_file():
                    raise PermanentError(f"{self.location / name}: shard listed in {INDEX_NAME} is missing")
            return files
        names = sorted(p.name for p in self.location.glob("*.safetensors") if p.name not in skip)
        if not names:
            raise PermanentError(f"{self.location}: no *.safetensors files and no {INDEX_NAME}")
        return {name: set() for name in names}

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._tensors)

    def file_of(self, key: str) -> Path:
        return self.location / self._where[key]

    def byte_ranges(self, key: str) -> list[ByteRange]:
        return [self._ranges[key]]

    def load(self, keys: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._where[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for name, file_keys in by_file.items():
            # Opened per call: the mapping (and the file pages it pulled in) is released with the handle.
            with safe_open(self.location / name, framework="pt") as handle:
                for key in file_keys:
                    tensor = handle.get_tensor(key)
                    out[key] = tensor.to(dtype)
        return {key: out[key] for key in keys}


def _data_ranges(path: Path) -> dict[str, ByteRange]:
    """Tensor name -> its bytes in a safetensors file (8-byte header length, JSON header, then the data)."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    start = 8 + size
    return {key: ByteRange(path, start + begin, end - begin)
            for key, entry in header.items() if key != "__metadata__"
            for begin, end in [entry["data_offsets"]]}


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def _safetensors_dtype(name: str) -> torch.dtype:
    if name not in _SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported safetensors dtype {name}")
    return _SAFETENSORS_DTYPES[name]


def open_source(location: Path) -> DcpSource | SafetensorsSource:
    """DCP when ``.metadata`` is present, safetensors otherwise."""
    location = Path(location)
    if not location.is_dir():
        raise PermanentError(f"{location}: checkpoint directory does not exist")
    if (location / METADATA).is_file():
        return DcpSource(location)
    return SafetensorsSource(location)
