"""Where a tensor's raw bytes sit inside a ``torch.save`` archive, so they can be copied without decoding.

DCP stores each tensor (chunk) as a ``torch.save`` zip archive at a byte range of a ``.distcp`` file. That archive
keeps each storage as an uncompressed record (``<archive>/data/<key>``) and describes the tensor in ``data.pkl``.
When the archive holds exactly one little-endian storage that *is* the tensor (offset 0, contiguous, same element
count), the record's bytes are the tensor's bytes and a converter can copy them straight from the file.

Anything else (several storages, a view into a larger storage, compression, big-endian, an unknown pickle) yields
``None``, and the caller decodes through ``torch.load`` instead. ``data.pkl`` is read by an unpickler that only
records the rebuild call's arguments: nothing in it is executed.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

# torch.save names a storage's element type by its legacy typed-storage class.
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "BFloat16Storage": torch.bfloat16, "HalfStorage": torch.float16,
                   "DoubleStorage": torch.float64}
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, (version .. sizes), name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"


class _Window(io.RawIOBase):
    """A read-only, seekable view of ``[start, start + length)`` of an open file (what zipfile needs)."""

    def __init__(self, handle: BinaryIO, start: int, length: int) -> None:
        self._handle, self._start, self._length, self._pos = handle, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._length - self._pos))
        self._handle.seek(self._start + self._pos)
        got = self._handle.readinto(view[:count]) or 0
        self._pos += got
        return got


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype | None
    numel: int


@dataclass(frozen=True)
class _Rebuilt:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _Rebuilt:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return _Rebuilt(storage, int(offset), tuple(size), tuple(stride))


class _TensorPickle(pickle.Unpickler):
    """Reads a plain tensor's ``data.pkl`` into a ``_Rebuilt`` record; refuses everything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        return _Storage(str(key), _STORAGE_DTYPES.get(storage_type), int(numel))


def _contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for dim, step in zip(reversed(size), reversed(stride)):
        if dim != 1 and step != expected:
            return False
        expected *= dim
    return True


def raw_tensor_offset(
    handle: BinaryIO, start: int, length: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> int | None:
    """Absolute file offset of the tensor's bytes in the archive at ``[start, start + length)``, or None."""
    numel = 1
    for dim in shape:
        numel *= dim
    try:
        with zipfile.ZipFile(_Window(handle, start, length)) as archive:
            names = archive.namelist()
            pkl = next((n for n in names if n.endswith("/data.pkl")), None)
            if pkl is None:
                return None
            prefix = pkl.removesuffix("data.pkl")
            if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder") != b"little":
                return None
            tensor = _TensorPickle(io.BytesIO(archive.read(pkl))).load()
            records = [n for n in names if n.startswith(f"{prefix}data/")]
            if not isinstance(tensor, _Rebuilt) or records != [f"{prefix}data/{tensor.storage.key}"]:
                return None
            if (tensor.storage.dtype != dtype or tensor.size != tuple(shape) or tensor.offset != 0
                    or tensor.storage.numel != numel or not _contiguous(tensor.size, tensor.stride)):
                return None
            info = archive.getinfo(records[0])
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != numel * dtype.itemsize:
                return None
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError):
        return None
    # The central directory gives the local header's position; the data follows its variable-length fields.
    handle.seek(start + info.header_offset)
    raw = handle.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        return None
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    if signature != _LOCAL_SIGNATURE:
        return None
    data = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    return start + data if data + info.file_size <= length else None
