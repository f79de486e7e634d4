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
from pathlib import Path

import numpy as np
import torch

from tasks.convert.sources import ByteRange

CHUNK_BYTES = 32 << 20  # per cast step: large enough to amortise the calls, small next to any shard
# Copies go in steps of this size, each one first asking the kernel to start reading the next two steps. The kernel's
# own readahead (a few MB) leaves the disk idle between requests; measured on a 4.4 GB cold-cache copy: 10-12 s
# without, 5-7 s with (cp: 11-12 s, with its sync).
READ_AHEAD_BYTES = 64 << 20
# copy_file_range can refuse a pair of files (another filesystem on old kernels, special files): fall back.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}


def _write_all(fd: int, data: memoryview, at: int) -> int:
    """pwrite all of ``data`` at offset ``at``; returns the offset after it."""
    while data:
        done = os.pwrite(fd, data, at)
        data, at = data[done:], at + done
    return at


def _prefetch(src: int, offset: int, length: int) -> None:
    """Start reading the source from ``offset`` on in the background. Past the range's end too: sources are read
    front to back, so what follows is usually the next tensor."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(src, offset + length, 2 * READ_AHEAD_BYTES, os.POSIX_FADV_WILLNEED)


def _read_exact(src: int, into: memoryview, offset: int, where: ByteRange) -> None:
    while into:
        got = os.preadv(src, [into], offset)
        if got == 0:
            raise EOFError(f"{where.path}: ends before byte {where.offset + where.length} (truncated?)")
        into, offset = into[got:], offset + got


class ByteMover:
    """Writes tensors into an output descriptor at given offsets (positional writes: the caller may fill a file in
    whatever order reads its sources best). Each method returns the offset after what it wrote. Holds the reusable
    cast buffers."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._chunk = chunk_bytes
        self._src: np.ndarray | None = None
        self._dst: np.ndarray | None = None
        self._kernel_copy = hasattr(os, "copy_file_range")
        self._open: dict[Path, int] = {}

    def __enter__(self) -> ByteMover:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()

    def _source(self, path: Path) -> int:
        """Source files stay open for the whole conversion: their readahead state carries over from one tensor to
        the next, and, as cp does, we tell the kernel they are read sequentially (it reads ahead further)."""
        if path not in self._open:
            fd = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._open[path] = fd
        return self._open[path]

    def copy(self, fd: int, at: int, ranges: Sequence[ByteRange]) -> int:
        """The ranges' bytes, unchanged, at ``at``."""
        for piece in ranges:
            src = self._source(piece.path)
            if self._kernel_copy:
                try:
                    at = self._kernel(src, fd, at, piece)
                    continue
                except OSError as exc:
                    if exc.errno not in _NO_KERNEL_COPY:
                        raise
                    self._kernel_copy = False
            at = self._through_memory(src, fd, at, piece)
        return at

    @staticmethod
    def _kernel(src: int, fd: int, at: int, piece: ByteRange) -> int:
        done = 0
        while done < piece.length:
            step = min(READ_AHEAD_BYTES, piece.length - done)
            _prefetch(src, piece.offset + done, step)
            got = os.copy_file_range(src, fd, step, piece.offset + done, at + done)
            if got == 0:
                raise EOFError(f"{piece.path}: ends before byte {piece.offset + piece.length} (truncated?)")
            done += got
        return at + done

    def _through_memory(self, src: int, fd: int, at: int, piece: ByteRange) -> int:
        buffer = memoryview(self._buffers(piece.length, 1, 1)[0])
        for start in range(0, piece.length, len(buffer)):
            part = buffer[:min(len(buffer), piece.length - start)]
            _prefetch(src, piece.offset + start, len(part))
            _read_exact(src, part, piece.offset + start, piece)
            at = _write_all(fd, part, at)
        return at

    def cast(self, fd: int, at: int, ranges: Sequence[ByteRange], src_dtype: torch.dtype, dtype: torch.dtype) -> int:
        """The ranges' elements (stored as ``src_dtype``) converted to ``dtype``, at ``at``, a chunk at a time."""
        src_buf, dst_buf = self._buffers(max((p.length for p in ranges), default=0), src_dtype.itemsize,
                                         dtype.itemsize)
        src_t, dst_t = torch.from_numpy(src_buf), torch.from_numpy(dst_buf)
        step = len(src_buf) // src_dtype.itemsize * src_dtype.itemsize  # whole elements per chunk
        for piece in ranges:
            src = self._source(piece.path)
            for start in range(0, piece.length, step):
                count = min(step, piece.length - start)
                _prefetch(src, piece.offset + start, count)
                _read_exact(src, memoryview(src_buf)[:count], piece.offset + start, piece)
                n = count // src_dtype.itemsize
                dst_t[:n * dtype.itemsize].view(dtype).copy_(src_t[:count].view(src_dtype))
                at = _write_all(fd, memoryview(dst_buf)[:n * dtype.itemsize], at)
        return at

    def write(self, fd: int, at: int, tensor: torch.Tensor) -> int:
        """An in-memory tensor's bytes (row-major, as safetensors stores them) at ``at``."""
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        return _write_all(fd, memoryview(flat.view(torch.uint8).numpy()), at)

    def _buffers(self, need: int, src_itemsize: int, dst_itemsize: int) -> tuple[np.ndarray, np.ndarray]:
        """Source and output buffers for steps of up to ``need`` source bytes (at most a chunk). Allocated once and
        touched right away (ones, not empty: every page faults in now, not on each use); grown only when a larger
        tensor or a wider output dtype needs more, so small checkpoints never pay for a whole chunk."""
        src_bytes = max(src_itemsize, min(self._chunk, need))
        if self._src is None or len(self._src) < src_bytes:
            self._src = np.ones(src_bytes, dtype=np.uint8)
        dst_bytes = len(self._src) // src_itemsize * dst_itemsize
        if self._dst is None or len(self._dst) < dst_bytes:
            self._dst = np.ones(dst_bytes, dtype=np.uint8)
        return self._src, self._dst
