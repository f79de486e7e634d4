"""``model.source: artifact``: a model this store already made (``model.path: convert/<key>``), e.g. an SFT run's
converted checkpoint that a DPO run starts from. The store is FINETUNE_STORE (else the checkout's .store/), the one
``finetune run`` uses without --store."""

from __future__ import annotations

from typing import Any

from finetune.hashing import hash_json
from finetune.stage import TABLES_FILE, PermanentError
from finetune.store import MANIFEST, Store, default_store_url

STAGES = ("convert", "download")
"""Stages whose artifacts are Hugging Face checkpoints a run can start from."""
BOOKKEEPING = (MANIFEST, TABLES_FILE)
"""The store's own files in an artifact: not part of the checkpoint."""


def resolve(path: str) -> tuple[str, dict[str, Any]]:
    """(where the artifact's files are read, its content identity) for ``model.path`` ``<stage>/<key>``; a
    PermanentError names what is missing."""
    stage, _, key = path.strip("/").partition("/")
    if stage not in STAGES or not key or "/" in key:
        raise PermanentError(f"model.path {path!r}: with model.source 'artifact' name a checkpoint of this store as "
                             f"<stage>/<key>, stage one of {', '.join(STAGES)} (e.g. convert/<key> of an SFT run)")
    store = Store(default_store_url())
    artifact = store.verified_artifact(stage, key)
    if artifact is None:
        raise PermanentError(f"model.path {path!r}: no finished, intact {stage} artifact {key} in store {store.url} "
                             "(set FINETUNE_STORE to the store the earlier run wrote)")
    where = artifact.path if store.is_local else store.fs.unstrip_protocol(store.remote_dir(stage, key))
    # The manifest's file hashes identify the content: no need to read the weights again to key the download.
    files = {name: record.sha256 for name, record in artifact.files.items()}
    return where, {"artifact": f"{stage}/{key}", "files": hash_json(files)}
