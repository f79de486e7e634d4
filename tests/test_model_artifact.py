"""model.source: artifact: a checkpoint this store made (an SFT run's convert artifact) as the base of a new run."""

from __future__ import annotations

from pathlib import Path

import pytest

import tasks.download as download
from finetune.model_artifact import resolve
from finetune.profile import ProfileError, load_profile
from finetune.stage import PermanentError
from finetune.store import Artifact, Store


def _converted(store: Store, key: str, weights: bytes) -> Artifact:
    work = store.prepare("convert", key, keep_partial=False)
    (work / "config.json").write_text("{}")
    (work / "model.safetensors").write_bytes(weights)
    return store.finish(Artifact("convert", key, str(work)))


def test_an_artifact_source_is_keyed_by_its_manifest_and_copied_without_the_bookkeeping(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")
    monkeypatch.setenv("FINETUNE_STORE", str(tmp_path / "store"))
    artifact = _converted(store, "k1", b"one")
    _converted(store, "k2", b"two")
    where, identity = resolve("convert/k1")
    assert where == artifact.path and identity["artifact"] == "convert/k1"
    assert resolve("convert/k2")[1] != identity  # other weights, another download key
    profile = load_profile("tiny-cpu", ["model.source=artifact", "model.path=convert/k1"])
    assert download.fingerprint(profile) == identity
    assert download._local_source(profile.model) == artifact.path

    with pytest.raises(PermanentError, match="no finished, intact convert artifact nope in store"):
        resolve("convert/nope")
    with pytest.raises(PermanentError, match="<stage>/<key>"):
        resolve("train/k1")
    with pytest.raises(ProfileError, match="source 'artifact' needs path"):
        load_profile("tiny-cpu", ["model.source=artifact"])
