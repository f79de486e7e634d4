"""Reading checkpoints as data: every pickle inside a checkpoint is read without running code from it.

Whoever can write the store (often a shared bucket) must not be able to run code in the trainers and stages that
read it. Tensors come from safetensors or from ``torch.load(weights_only=True)``; the pickles torch's own readers
open with plain ``pickle`` are read here instead:

- DCP's ``.metadata`` (torch's ``FileSystemReader.read_metadata`` uses ``pickle.load``): an unpickler that admits
  only DCP's metadata classes and the torch values inside them;
- DCP's non-tensor values (``DefaultLoadPlanner.load_bytes`` uses ``torch.load(weights_only=False)``): python
  scalars, containers and tensors only (``weights_only=True``).

``SafeFileSystemReader`` and ``SafeLoadPlanner`` are those two readers with the safe reads; ``load_dcp`` is
``torch.distributed.checkpoint.load`` with both. ``torch_load`` is ``torch.load(weights_only=True)`` for single
files. A refused pickle raises ``UnsafeCheckpointError`` naming the file and what was refused. Used by the recipe
(resume), llama4tune's checkpointer and convert.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

# (module, name) pairs a DCP .metadata pickle may reference: DCP's dataclasses and the torch values inside them.
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_SAFE_GLOBALS = {
    (_DCP_METADATA_MODULE, name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
                 "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than data (a pickle referencing code), or cannot be parsed."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_dcp_metadata(meta_file: str | os.PathLike[str]) -> Metadata:
    """The DCP ``Metadata`` pickled in ``meta_file``, unpickled with the allow-list and checked to stay inside its
    checkpoint directory (a data file named ``../x`` or ``/x`` is refused)."""
    meta_file = Path(meta_file)
    try:
        with open(meta_file, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError) as exc:
        raise UnsafeCheckpointError(f"{meta_file}: unreadable DCP metadata: {exc}") from exc
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{meta_file}: holds a {type(metadata).__name__}, not DCP Metadata")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise UnsafeCheckpointError(f"{meta_file}: data file {name!r} is not a file inside the checkpoint")
    return metadata


def torch_load(path: str | os.PathLike[str] | io.BytesIO, what: str = "") -> Any:
    """``torch.load`` of tensors, python scalars and containers only (``weights_only=True``), on CPU."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{what or path}: {_refusal(exc)}") from exc


def _refusal(exc: pickle.UnpicklingError) -> str:
    # torch's message is mostly advice to load with weights_only=False; keep only what was refused.
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", str(exc), re.MULTILINE)
    reason = found.group(1) if found else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"refused to unpickle, it is not plain data: {reason}"


class SafeFileSystemReader(FileSystemReader):
    """torch's DCP file reader, with ``.metadata`` read through the allow-list (or given, already read: a reader
    that loads a few tensors at a time then parses it once)."""

    def __init__(self, path: str | os.PathLike[str], metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self._metadata or read_dcp_metadata(self._get_metadata_path(kwargs.get("rank")))
        # As upstream's read_metadata: the load id travels on the metadata.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """torch's default load planner, with non-tensor values read by ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        loaded = torch_load(value, what=f"DCP value {fqn!r}")
        if self.flatten_state_dict:  # as upstream's load_bytes, with the safe load
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def load_dcp(state: dict[str, Any], path: str | os.PathLike[str], *, no_dist: bool,
             reader: SafeFileSystemReader | None = None) -> None:
    """``torch.distributed.checkpoint.load`` of ``path`` into ``state`` (in place), reading only data."""
    try:
        dcp.load(state, storage_reader=reader or SafeFileSystemReader(path), planner=SafeLoadPlanner(),
                 no_dist=no_dist)
    except dcp.CheckpointException as exc:  # DCP wraps each rank's error with its traceback: name the refusal
        for error, _ in exc.failures.values():
            if isinstance(error, UnsafeCheckpointError):
                raise UnsafeCheckpointError(f"{path}: {error}") from exc
            if isinstance(error, pickle.UnpicklingError):  # a tensor payload, read by torch with weights_only=True
                raise UnsafeCheckpointError(f"{path}: {_refusal(error)}") from exc
        raise
