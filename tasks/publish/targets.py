"""Where the publish stage puts files, and whether they are still there: any fsspec location (a local directory,
``s3://``, ``memory://``, ...) or a Hugging Face hub repo (``hf://<org>/<repo>``, one commit per publish, its
revision recorded). The hub token comes from the environment (``HF_TOKEN``) or the hub's own login, never from the
profile, and is never written anywhere.

A record (``publish.json``, and the stage's metrics) is ``{target, kind, revision, files: {name: {size, sha256}}}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune.hashing import copy_hashed, sha256_stream
from finetune.stage import PermanentError

HF_PREFIX = "hf://"


def hub_repo_id(target: str) -> str:
    repo_id = target[len(HF_PREFIX):].strip("/")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PermanentError(f"publish.target '{target}': a hub target is hf://<org>/<repo>")
    return repo_id


def publish(target: str, files: Mapping[str, Path], *, private: bool, message: str) -> dict[str, Any]:
    """Put ``files`` (name in the target -> local file) at ``target``; return what was published."""
    if target.startswith(HF_PREFIX):
        return _publish_hub(target, files, private=private, message=message)
    return _publish_fsspec(target, files)


def still_published(record: Mapping[str, Any]) -> bool:
    """Whether the target still holds every file of ``record`` with its recorded size and sha256."""
    if record.get("kind") == "hf":
        return _hub_intact(record)
    return _fsspec_intact(record)


def _publish_fsspec(target: str, files: Mapping[str, Path]) -> dict[str, Any]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(target)
    published: dict[str, dict[str, Any]] = {}
    for name, path in files.items():
        destination = f"{root.rstrip('/')}/{name}"
        fs.makedirs(destination.rsplit("/", 1)[0], exist_ok=True)
        with open(path, "rb") as src, fs.open(destination, "wb") as dst:
            published[name] = {"size": path.stat().st_size, "sha256": copy_hashed(src, dst)}
    return {"target": target, "kind": "fsspec", "revision": None, "files": published}


def _fsspec_intact(record: Mapping[str, Any]) -> bool:
    import fsspec

    fs, root = fsspec.core.url_to_fs(record["target"])
    for name, expected in record["files"].items():
        path = f"{root.rstrip('/')}/{name}"
        try:
            if fs.info(path).get("size") != expected["size"]:
                return False
            with fs.open(path, "rb") as handle:
                if sha256_stream(handle) != expected["sha256"]:
                    return False
        except FileNotFoundError:
            return False
    return True


def _publish_hub(target: str, files: Mapping[str, Path], *, private: bool, message: str) -> dict[str, Any]:
    from huggingface_hub import CommitOperationAdd, HfApi

    repo_id = hub_repo_id(target)
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    # One commit with exactly these files (what upload_folder does, without staging a folder of links).
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    commit = api.create_commit(repo_id, operations=operations, commit_message=message)
    # The upload hashed every file already (the LFS/Xet protocol needs its sha256): no second read of the weights.
    published = {op.path_in_repo: {"size": op.upload_info.size, "sha256": op.upload_info.sha256.hex()}
                 for op in operations}
    return {"target": target, "kind": "hf", "revision": commit.oid, "url": commit.commit_url, "files": published}


def _hub_intact(record: Mapping[str, Any]) -> bool:
    """The files at the repo's head: sizes, and the sha256 the hub keeps for LFS files (weights); small text files
    are compared by size."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        entries = {entry.path: entry for entry in HfApi().list_repo_tree(hub_repo_id(record["target"]),
                                                                          recursive=True)}
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return False
    for name, expected in record["files"].items():
        entry = entries.get(name)
        if entry is None or getattr(entry, "size", None) != expected["size"]:
            return False
        lfs = getattr(entry, "lfs", None)
        if lfs is not None and lfs.sha256 != expected["sha256"]:
            return False
    return True
