"""Is the artifact store usable? Checked before anything runs (``finetune run``, a deployment's preflight).

One problem per line, each naming the store: not reachable (the URL's filesystem or bucket cannot be listed), not
writable (a probe file cannot be created and removed: read-only mount, permissions, credentials), out of space (a
local store's filesystem has less free than the run needs; object stores report no free space). Why a probe write
rather than ``os.access``: a read-only mount, a full quota or a bucket policy only show on a real write, and ``root``
passes every permission check ``os.access`` makes.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

GIB = 1 << 30
MIN_FREE_BYTES = 1 * GIB
"""What any run needs at least: run logs, run records, the packed data and the tiny model's checkpoints."""
PROBE_PREFIX = ".store-check-"


def check_store(url: str, need_bytes: int = MIN_FREE_BYTES) -> list[str]:
    """Problems that keep a run from using the store at ``url`` (empty: usable), one line each."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its package missing (s3fs, gcsfs)
        return [f"store {url}: not reachable: {_first_line(exc)}"]
    if isinstance(fs, LocalFileSystem):
        return _check_local(url, Path(root), need_bytes)
    return _check_remote(url, fs, root.rstrip("/"))


def _check_local(url: str, root: Path, need_bytes: int) -> list[str]:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return [f"store {url}: cannot create it: {_os_reason(exc)}"]
    probe = root / f"{PROBE_PREFIX}{secrets.token_hex(4)}"
    try:
        with open(probe, "wb") as handle:
            try:
                handle.write(b"probe")
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                probe.unlink()
    except OSError as exc:
        return [f"store {url}: not writable: {_os_reason(exc)}"]
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        return [f"store {url}: out of space: {free / GIB:.2f} GiB free, the run needs at least "
                f"{need_bytes / GIB:.2f} GiB"]
    return []


def _check_remote(url: str, fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    try:
        fs.exists(root)
        fs.ls(root.split("/", 1)[0], detail=False)  # the bucket (or top level) answers with these credentials
    except Exception as exc:  # noqa: BLE001 - each backend raises its own errors (botocore, aiohttp, gcsfs)
        return [f"store {url}: not reachable: {_first_line(exc)}"]
    probe = f"{root}/{PROBE_PREFIX}{secrets.token_hex(4)}"
    try:
        fs.pipe_file(probe, b"probe")
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001 - as above
        return [f"store {url}: not writable: {_first_line(exc)}"]
    return []


def _os_reason(exc: OSError) -> str:
    return f"{exc.strerror} ({exc.filename})" if exc.strerror and exc.filename else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
