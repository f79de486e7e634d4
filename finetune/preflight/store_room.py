"""Is the store writable, with room for what this run will write? (finetune.preflight)"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from finetune.store import Store, scratch_root

GB = 1e9


def check_store_room(store: Store, need_bytes: int) -> str | None:
    """One line saying what is wrong with ``store`` for a run writing ``need_bytes`` and what to do, or None.

    A local store is probed with a real write (permissions, read-only mounts) and its free space is read; an object
    store's room cannot be read, so only its local scratch mirror is checked."""
    root = Path(store.root) if store.is_local else scratch_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".preflight-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return (f"store {root} is not writable ({exc.strerror or exc}): pass --store / FINETUNE_STORE a directory "
                "this user can write")
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        return (f"store {root} has {free / GB:,.1f} GB free but this run writes about {need_bytes / GB:,.1f} GB "
                "(download and the stages after it): free space there, or pass --store / FINETUNE_STORE a larger "
                "volume")
    return None
