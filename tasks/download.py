"""download: the base model as a local Hugging Face checkpoint directory, verified file by file.

Sources:
- ``hub``: ``huggingface_hub.snapshot_download`` at a pinned commit (resumable: partial files survive a retry in the
  stage's working directory); every file is checked against the hub's own size and hash (LFS sha256, git blob sha1).
- ``local``: a directory or any fsspec URL (``s3://bucket/model``), copied with a hash computed on the way and checked.
- ``embedded``: the tiny Llama 4 the project builds itself, then taken through the ``local`` path exactly like a
  user's own checkpoint.

``HF_TOKEN`` is read from the environment at call time and handed to huggingface_hub only: it never enters a log line,
the profile, the key or the artifact.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import fsspec

from finetune.hashing import hash_json, hash_tree, sha256_file
from finetune.profile import COMMIT_SHA, ModelConfig, Profile, resolve_repo_path
from finetune.stage import PermanentError, StageContext, StageSpec
from finetune.store import atomic_file, scratch_root

REQUIRED_FILES = ("config.json",)


def embedded_model_dir(seed: int) -> Path:
    """Build (once per seed and builder source) the embedded tiny model and return its directory."""
    import embedded

    # The build is deterministic in the builder's code and the data its tokenizer is trained on.
    sources = Path(embedded.__file__).parent
    builder = hash_json([sha256_file(sources / name) for name in (
        "tiny_model.py", "tokenizer.py", "dataset.py", "data/train.jsonl")])
    target = scratch_root() / "embedded" / f"tiny-llama4-{builder[:12]}-seed{seed}"
    if not (target / "config.json").is_file():
        # Imported only to build: it pulls in torch and transformers, ~10 s a cached rerun need not pay.
        from embedded.tiny_model import build_tiny_model

        build_tiny_model(target, seed=seed)
    return target


def resolve_revision(model: ModelConfig) -> str:
    assert model.repo_id and model.revision
    if COMMIT_SHA.match(model.revision):
        return model.revision
    from huggingface_hub import HfApi

    return HfApi().model_info(model.repo_id, revision=model.revision, token=os.environ.get("HF_TOKEN") or None).sha


def _local_source(model: ModelConfig) -> str:
    if model.source == "embedded":
        return str(embedded_model_dir(model.seed))
    assert model.path is not None
    return model.path if "://" in model.path else str(resolve_repo_path(model.path))


def fingerprint(profile: Profile) -> dict[str, Any]:
    model = profile.model
    if model.source == "hub":
        # A commit names exact content, so the key needs no file reads; a branch or tag is resolved to the commit it
        # points at now, so a moved branch means a new key instead of a stale cache hit.
        return {"repo_id": model.repo_id, "revision": resolve_revision(model)}
    source = _local_source(model)
    if "://" not in source:
        return {"content": hash_tree(Path(source))}
    fs, root = fsspec.core.url_to_fs(source)
    # Object stores give a content tag (ETag/md5) per object: key by those rather than downloading to hash.
    listing = {str(p)[len(root):]: {k: v for k, v in info.items() if k in ("size", "ETag", "etag", "md5", "mtime")}
               for p, info in fs.find(root, detail=True).items()}
    return {"url": source, "objects": listing}


def _filtered(names: list[str], model: ModelConfig) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(names, allow_patterns=model.allow_patterns, ignore_patterns=model.ignore_patterns))


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download_hub(ctx: StageContext) -> dict[str, Any]:
    from huggingface_hub import HfApi, snapshot_download

    model = ctx.profile.model
    token = os.environ.get("HF_TOKEN") or None
    revision = resolve_revision(model)
    info = HfApi().model_info(model.repo_id, revision=revision, files_metadata=True, token=token)
    expected = {s.rfilename: s for s in info.siblings or [] if s.rfilename in _filtered(
        [s.rfilename for s in info.siblings or []], model)}
    ctx.log(f"downloading {len(expected)} files of {model.repo_id}@{revision}")
    snapshot_download(
        model.repo_id, revision=revision, local_dir=ctx.workdir, token=token,
        allow_patterns=model.allow_patterns, ignore_patterns=model.ignore_patterns,
    )
    shutil.rmtree(ctx.workdir / ".cache", ignore_errors=True)  # hub bookkeeping, not part of the model
    for done, (name, sibling) in enumerate(sorted(expected.items()), 1):
        path = ctx.workdir / name
        if not path.is_file() or (sibling.size is not None and path.stat().st_size != sibling.size):
            raise RuntimeError(f"{name}: size {path.stat().st_size if path.exists() else 'missing'} "
                               f"!= hub size {sibling.size}; the download was truncated, retrying")
        if sibling.lfs is not None:
            if sha256_file(path) != sibling.lfs.sha256:
                raise RuntimeError(f"{name}: sha256 differs from the hub's LFS hash; the file was altered")
        elif sibling.blob_id and _git_blob_sha1(path) != sibling.blob_id:
            raise RuntimeError(f"{name}: git blob hash differs from the hub's; the file was altered")
        ctx.progress(done / max(len(expected), 1), f"verified {name}")
    return {"source": "hub", "repo_id": model.repo_id, "revision": revision}


def _copy_verified(fs: fsspec.AbstractFileSystem, src: str, dst: Path, size: int | None) -> None:
    digest = hashlib.sha256()
    with fs.open(src, "rb") as reader, atomic_file(dst, "wb") as writer:
        while chunk := reader.read(8 << 20):
            digest.update(chunk)
            writer.write(chunk)
    if size is not None and dst.stat().st_size != size:
        raise RuntimeError(f"{src}: copied {dst.stat().st_size} bytes but the source has {size}; retrying")
    if sha256_file(dst) != digest.hexdigest():
        raise RuntimeError(f"{dst}: content changed while copying from {src}")


def _download_local(ctx: StageContext) -> dict[str, Any]:
    model = ctx.profile.model
    source = _local_source(model)
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.isdir(root):
        raise PermanentError(f"model.path: {source} is not a directory")
    found = fs.find(root, detail=True)
    names = {str(path)[len(root.rstrip('/')) + 1:]: info for path, info in found.items()}
    wanted = _filtered(sorted(names), model)
    for done, name in enumerate(wanted, 1):
        _copy_verified(fs, f"{root.rstrip('/')}/{name}", ctx.workdir / name, names[name].get("size"))
        ctx.progress(done / len(wanted), f"copied {name}")
    return {"source": model.source, "path": source}


def run(ctx: StageContext) -> dict[str, Any]:
    model = ctx.profile.model
    metrics = _download_hub(ctx) if model.source == "hub" else _download_local(ctx)
    for required in REQUIRED_FILES:
        if not (ctx.workdir / required).is_file():
            raise PermanentError(f"model source has no {required}: not a Hugging Face checkpoint directory")
    files = sorted(p for p in ctx.workdir.rglob("*") if p.is_file())
    metrics.update(files=len(files), bytes=sum(p.stat().st_size for p in files))
    ctx.tables["model_files"] = [
        {"file": str(p.relative_to(ctx.workdir)), "MB": round(p.stat().st_size / 1e6, 3)} for p in files]
    return metrics


def config(profile: Profile) -> dict[str, Any]:
    # The seed and path are covered by the fingerprint; the token is deliberately absent.
    model = profile.model
    return {"source": model.source, "allow": model.allow_patterns, "ignore": model.ignore_patterns}


SPEC = StageSpec(name="download", version="1", run=run, config=config, fingerprint=fingerprint, resumable=True)
