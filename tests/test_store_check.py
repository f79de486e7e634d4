"""The store is checked before anything runs: one line naming the store and what is wrong."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.store_check import check_store


def test_a_usable_store_has_no_problems_and_keeps_no_probe(tmp_path: Path) -> None:
    assert check_store(str(tmp_path / "store"), need_bytes=1) == []
    assert list((tmp_path / "store").iterdir()) == []
    assert check_store("memory://checked-store", need_bytes=1) == []


def test_a_store_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    [problem] = check_store(str(tmp_path / "file" / "store"))
    assert problem.startswith(f"store {tmp_path}/file/store: cannot create it: ") and "Not a directory" in problem


def test_a_store_without_the_space_the_run_needs_is_named(tmp_path: Path) -> None:
    [problem] = check_store(str(tmp_path), need_bytes=1 << 60)
    assert problem.startswith(f"store {tmp_path}: out of space: ") and "needs at least 1073741824.00 GiB" in problem


def test_an_unknown_protocol_is_not_reachable() -> None:
    [problem] = check_store("nosuchproto://bucket/store")
    assert problem.startswith("store nosuchproto://bucket/store: not reachable: ")


def _can_mount_read_only(target: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {target}"],
                           capture_output=True)
    return probe.returncode == 0


def test_run_on_a_read_only_store_fails_in_one_line(tmp_path: Path) -> None:
    """The case from issue 27: a read-only --store printed a 20-line traceback; now one line, exit 2."""
    store = tmp_path / "ro"
    store.mkdir()
    if not _can_mount_read_only(store):
        pytest.skip("needs a private mount namespace (unshare -m) to mount a read-only filesystem")
    command = (f"mount -t tmpfs -o ro tmpfs {store} && exec {sys.executable} -m entrypoints.cli run --store {store} "
               "--until download")
    result = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "FINETUNE_SCRATCH": str(tmp_path / "scratch")})
    output = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(output) <= 3, output
    assert output[-1].startswith(f"error: store {store}: not writable: Read-only file system")
