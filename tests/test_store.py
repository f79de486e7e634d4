"""The store trusts a stage only while its artifact.json verifies, and never writes into a finished one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from finetune.store import MANIFEST, Artifact, Store, atomic_file


def _finish(store: Store, stage: str = "pack", key: str = "k1", payload: bytes = b"hello") -> Artifact:
    work = store.prepare(stage, key, keep_partial=False)
    (work / "sub").mkdir()
    (work / "sub" / "data.bin").write_bytes(payload)
    return store.finish(Artifact(stage=stage, key=key, path=str(work), metrics={"n": 1}))


def test_finish_records_sizes_and_hashes_and_writes_manifest_last(tmp_path: Path) -> None:
    store = Store(tmp_path)
    artifact = _finish(store)
    manifest = json.loads((Path(artifact.path) / MANIFEST).read_text())
    record = manifest["files"]["sub/data.bin"]
    assert record["size"] == 5
    assert record["sha256"] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert store.verified_artifact("pack", "k1").metrics == {"n": 1}


def test_deleted_file_makes_the_artifact_untrusted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    artifact = _finish(store)
    (Path(artifact.path) / "sub" / "data.bin").unlink()
    assert store.verified_artifact("pack", "k1") is None


def test_same_size_edit_is_detected_through_the_hash(tmp_path: Path) -> None:
    store = Store(tmp_path)
    artifact = _finish(store)
    target = Path(artifact.path) / "sub" / "data.bin"
    target.write_bytes(b"jello")
    assert store.verified_artifact("pack", "k1") is None


def test_same_size_edit_with_restored_mtime_is_caught_by_a_deep_check(tmp_path: Path) -> None:
    store = Store(tmp_path)
    artifact = _finish(store)
    target = Path(artifact.path) / "sub" / "data.bin"
    stat = target.stat()
    target.write_bytes(b"jello")
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.verified_artifact("pack", "k1") is not None  # the cheap check trusts size + mtime
    assert store.verified_artifact("pack", "k1", deep=True) is None


def test_corrupt_manifest_counts_as_unfinished(tmp_path: Path) -> None:
    store = Store(tmp_path)
    artifact = _finish(store)
    (Path(artifact.path) / MANIFEST).write_text("{not json")
    assert store.read_artifact("pack", "k1") is None
    assert store.prepare("pack", "k1", keep_partial=False).is_dir()


def test_finished_artifact_is_never_handed_out_for_writing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _finish(store)
    with pytest.raises(FileExistsError, match="finished"):
        store.prepare("pack", "k1", keep_partial=False)


def test_prepare_clears_leftovers_unless_the_stage_resumes(tmp_path: Path) -> None:
    store = Store(tmp_path)
    work = store.prepare("train", "k", keep_partial=True)
    (work / "checkpoint").write_text("step 5")
    assert (store.prepare("train", "k", keep_partial=True) / "checkpoint").exists()
    assert not (store.prepare("train", "k", keep_partial=False) / "checkpoint").exists()


def test_atomic_file_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as handle:
            handle.write("partial")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_remote_store_uploads_files_then_manifest_and_mirrors_them_back(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FINETUNE_SCRATCH", str(tmp_path / "scratch"))
    store = Store(f"memory://{tmp_path.name}/store")  # the memory file system is one per process
    artifact = _finish(store, payload=b"remote bytes")
    assert store.fs.cat(f"{store.remote_dir('pack', 'k1')}/sub/data.bin") == b"remote bytes"
    Path(artifact.path, "sub", "data.bin").unlink()  # a new machine has no local mirror
    again = store.verified_artifact("pack", "k1")
    # Verified from the store's listing alone: a cached rerun downloads nothing.
    assert again is not None and not Path(again.path, "sub", "data.bin").exists()
    store.materialize(again)  # what a stage reading it does
    mirrored = Path(again.path, "sub", "data.bin")
    assert mirrored.read_bytes() == b"remote bytes"
    assert mirrored.stat().st_mtime_ns == again.files["sub/data.bin"].mtime_ns  # next check is a stat
    assert store.list_stage("pack") == ["k1"]


def test_remote_store_verification_catches_a_damaged_object_without_downloading_it(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    monkeypatch.setenv("FINETUNE_SCRATCH", str(tmp_path / "scratch"))
    store = Store(f"memory://{tmp_path.name}/store")  # the memory file system is one per process
    _finish(store, payload=b"remote bytes")
    obj = f"{store.remote_dir('pack', 'k1')}/sub/data.bin"
    store.fs.pipe(obj, b"remote byte")  # truncated
    assert store.verified_artifact("pack", "k1") is None
    store.fs.pipe(obj, b"REMOTE BYTES")  # same size, other content: only a deep check (streamed hash) sees it
    assert store.verified_artifact("pack", "k1") is not None
    assert store.verified_artifact("pack", "k1", deep=True) is None
    artifact = store.read_artifact("pack", "k1")
    assert artifact is not None
    shutil.rmtree(artifact.path)
    with pytest.raises(OSError, match="changed in the store"):
        store.materialize(artifact)
    assert not Path(artifact.path, "sub", "data.bin").exists()  # the changed bytes never reach the mirror


def test_broken_finished_artifact_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    artifact = _finish(store)
    (Path(artifact.path) / "sub" / "data.bin").write_bytes(b"tampered!")
    work = store.prepare("pack", "k1", keep_partial=False)
    assert list(work.iterdir()) == []
    (kept,) = (tmp_path / "pack" / ".quarantine").iterdir()
    assert kept.name.startswith("k1.") and (kept / "sub" / "data.bin").read_bytes() == b"tampered!"


def test_atomic_file_errors_name_the_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(OSError, match=r"out\.bin"):
        with atomic_file(target, "wb"):
            raise OSError("1000 requested and 10 written")
    assert list(tmp_path.iterdir()) == []
