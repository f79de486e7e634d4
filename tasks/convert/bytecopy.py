"""Moving a tensor's bytes into an open output file without holding the tensor: kernel copies for bytes that stay
as they are, chunked casts through reused buffers, and plain writes for tensors already in memory.

Why: on the VMs we measured, first-touch page faults make filling fresh buffers ~400 MB/s, while an in-kernel copy
(``copy_file_range``, what ``cp`` uses) never brings the bytes into the process at all. Casting must pass through
memory, so it reuses two chunk-sized buffers for the whole conversion and touches their pages only once.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence

import numpy as np
import torch

from tasks.convert.sources import ByteRange

CHUNK_BYTES = 32 << 20  # per cast step: large enough to amortise the calls, small next to any shard
# copy_file_range can refuse a pair of files (another filesystem on old kernels, special files): fall back.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def _read_exact(src: int, into: memoryview, offset: int, where: ByteRange) -> None:
    while into:
        got = os.preadv(src, [into], offset)
        if got == 0:
            raise EOFError(f"{where.path}: ends before byte {where.offset + where.length} (truncated?)")
        into, offset = into[got:], offset + got


class ByteMover:
    """Writes tensors into an output descriptor at its current position. Holds the reusable cast buffers."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._chunk = chunk_bytes
        self._src: np.ndarray | None = None
        self._dst: np.ndarray | None = None
        self._kernel_copy = hasattr(os, "copy_file_range")

    def copy(self, fd: int, ranges: Sequence[ByteRange]) -> None:
        """Append the ranges' bytes unchanged."""
        for piece in ranges:
            with open(piece.path, "rb") as src:
                if self._kernel_copy:
                    try:
                        self._kernel(src.fileno(), fd, piece)
                        continue
                    except OSError as exc:
                        if exc.errno not in _NO_KERNEL_COPY:
                            raise
                        self._kernel_copy = False
                self._through_memory(src.fileno(), fd, piece)

    @staticmethod
    def _kernel(src: int, fd: int, piece: ByteRange) -> None:
        done = 0
        while done < piece.length:
            got = os.copy_file_range(src, fd, piece.length - done, piece.offset + done)
            if got == 0:
                raise EOFError(f"{piece.path}: ends before byte {piece.offset + piece.length} (truncated?)")
            done += got

    def _through_memory(self, src: int, fd: int, piece: ByteRange) -> None:
        buffer = memoryview(self._source_buffer())
        for start in range(0, piece.length, self._chunk):
            part = buffer[:min(self._chunk, piece.length - start)]
            _read_exact(src, part, piece.offset + start, piece)
            _write_all(fd, part)

    def cast(self, fd: int, ranges: Sequence[ByteRange], src_dtype: torch.dtype, dtype: torch.dtype) -> None:
        """Append the ranges' elements (stored as ``src_dtype``) converted to ``dtype``, a chunk at a time."""
        src_buf, dst_buf = self._buffers(src_dtype.itemsize, dtype.itemsize)
        src_t, dst_t = torch.from_numpy(src_buf), torch.from_numpy(dst_buf)
        step = self._chunk // src_dtype.itemsize * src_dtype.itemsize  # whole elements per chunk
        for piece in ranges:
            with open(piece.path, "rb") as src:
                for start in range(0, piece.length, step):
                    count = min(step, piece.length - start)
                    _read_exact(src.fileno(), memoryview(src_buf)[:count], piece.offset + start, piece)
                    n = count // src_dtype.itemsize
                    dst_t[:n * dtype.itemsize].view(dtype).copy_(src_t[:count].view(src_dtype))
                    _write_all(fd, memoryview(dst_buf)[:n * dtype.itemsize])

    def write(self, fd: int, tensor: torch.Tensor) -> None:
        """Append an in-memory tensor's bytes (row-major, as safetensors stores them)."""
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        _write_all(fd, memoryview(flat.view(torch.uint8).numpy()))

    def _source_buffer(self) -> np.ndarray:
        if self._src is None:
            self._src = np.ones(self._chunk, dtype=np.uint8)  # ones, not empty: fault every page in once, now
        return self._src

    def _buffers(self, src_itemsize: int, dst_itemsize: int) -> tuple[np.ndarray, np.ndarray]:
        """The two cast buffers, allocated and touched once, grown only if a wider output dtype needs more."""
        dst_bytes = self._chunk // src_itemsize * dst_itemsize
        if self._dst is None or len(self._dst) < dst_bytes:
            self._dst = np.ones(dst_bytes, dtype=np.uint8)
        return self._source_buffer(), self._dst
