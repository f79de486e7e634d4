"""The artifact store: ``<root>/<stage>/<key>/`` directories, each finished by an ``artifact.json`` written last.

A directory without ``artifact.json`` is unfinished and never trusted. ``artifact.json`` lists every file with size,
sha256 and mtime; an artifact only counts as present while every listed file still matches (size always; content
re-hashed whenever the mtime moved, or always with ``deep=True``).

The root is a local directory or any fsspec URL. Stages always work in a local directory: for a local store that is
the final directory itself (so a preempted trainer finds its checkpoints there); for a remote store it is a local
scratch mirror whose files are uploaded before ``artifact.json`` is written. A remote artifact is verified from one
listing of its prefix (sizes; ``deep=True`` streams sha256) and downloaded into the mirror only when a stage reads
it (``materialize``), so a fully cached rerun against an object store moves no checkpoint bytes.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from finetune.hashing import copy_hashed, hash_json, sha256_file, sha256_stream
from finetune.profile import REPO_ROOT

MANIFEST = "artifact.json"
FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"  # atomic_file's temp files: ".<name>.<random>.tmp" beside the target


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str
    mtime_ns: int = 0


@dataclass
class Artifact:
    """What a finished stage produced. ``path`` is where its files can be read locally."""

    stage: str
    key: str
    path: str
    inputs: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str) -> Artifact:
        files = {name: FileRecord(**record) for name, record in data.get("files", {}).items()}
        return cls(
            stage=data["stage"], key=data["key"], path=path, inputs=data.get("inputs", {}),
            config=data.get("config", {}), files=files, metrics=data.get("metrics", {}),
            timings=data.get("timings", {}), format=data.get("format", FORMAT_VERSION),
        )


class Store:
    def __init__(self, url: str | os.PathLike[str]):
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = Path(root).resolve() if self.is_local else root.rstrip("/")
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- locations ---------------------------------------------------------------------------------------------
    def remote_dir(self, stage: str, key: str) -> str:
        return f"{self.root}/{stage}/{key}"

    def local_dir(self, stage: str, key: str) -> Path:
        """Where a stage reads and writes its files on this machine."""
        if self.is_local:
            return Path(self.root) / stage / key
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]  # "s3" of (s3, s3a)
        return scratch_root() / protocol / self.root.replace("/", "_") / stage / key

    def results_dir(self) -> Path:
        """Prefect's persisted task results (its cache records), on this machine, never in the store: Prefect
        deserializes a record with the serializer the record itself names (prefect/_internal/result_records.py,
        ResultRecord.deserialize), pickle included, so a record planted in a shared store would run code here.
        The store's artifact.json stays the truth: another machine's rerun finds the verified artifact instead."""
        return scratch_root() / "prefect-results" / hash_json({"store": self.url}, 16)

    def runs_dir(self) -> Path:
        """Run logs and run records (``finetune report``), one file per run, outside every stage's directory:
        ``<store>/runs`` in a local store, beside the scratch mirror otherwise."""
        return Path(self.root) / "runs" if self.is_local else scratch_root() / "runs" / self.root.replace("/", "_")

    # -- reading -----------------------------------------------------------------------------------------------
    def read_artifact(self, stage: str, key: str) -> Artifact | None:
        manifest = f"{self.remote_dir(stage, key)}/{MANIFEST}"
        try:
            with self.fs.open(manifest, "r") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError):
            return None  # a corrupt manifest is an unfinished stage
        if data.get("stage") != stage or data.get("key") != key:
            return None
        return Artifact.from_json(data, str(self.local_dir(stage, key)))

    def verified_artifact(self, stage: str, key: str, deep: bool = False) -> Artifact | None:
        """The finished artifact if every file it lists is still intact; None means: recompute.

        Local store: sizes, and sha256 where an mtime moved (``deep``: always). Remote store: sizes from one listing
        of the artifact's prefix (``deep``: sha256 streamed from the store); nothing is downloaded, so a cached
        rerun against an object store costs one listing per stage, not a copy of every checkpoint. Files reach this
        machine only when a stage reads them (``materialize``).
        """
        artifact = self.read_artifact(stage, key)
        if artifact is None:
            return None
        if not self.is_local:
            return artifact if self._remote_intact(artifact, deep) else None
        base = Path(artifact.path)
        for name, record in artifact.files.items():
            if not _intact(base / name, record, deep):
                return None
        return artifact

    def _remote_intact(self, artifact: Artifact, deep: bool) -> bool:
        remote = self.remote_dir(artifact.stage, artifact.key)
        try:
            listed = self.fs.find(remote, detail=True)
        except FileNotFoundError:
            return False
        prefix = self.fs._strip_protocol(remote).rstrip("/") + "/"  # how the listing spells paths
        sizes = {path[len(prefix):]: info.get("size") for path, info in listed.items() if path.startswith(prefix)}
        for name, record in artifact.files.items():
            if sizes.get(name) != record.size:
                return False
            if deep and hash_local_or_remote(self.fs.unstrip_protocol(f"{remote}/{name}")) != record.sha256:
                return False
        return True

    def materialize(self, artifact: Artifact, names: Iterable[str] | None = None) -> Artifact:
        """Make the artifact's files (or only ``names``) readable at ``artifact.path`` on this machine.

        Local store: nothing to do. Remote store: download into the scratch mirror what is missing there or
        differs from the manifest; a downloaded file gets the recorded mtime, so the next check is a stat, not a
        rehash.
        """
        if self.is_local:
            return artifact
        remote = self.remote_dir(artifact.stage, artifact.key)
        base = Path(artifact.path)
        wanted = artifact.files if names is None else {n: artifact.files[n] for n in names if n in artifact.files}
        for name, record in wanted.items():
            target = base / name
            if _intact(target, record, deep=False):
                continue
            with self.fs.open(f"{remote}/{name}", "rb") as src, atomic_file(target, "wb") as dst:
                if copy_hashed(src, dst) != record.sha256:  # raised inside: the bad copy never lands in the mirror
                    raise OSError(f"{remote}/{name} changed in the store after it was verified (sha256 differs "
                                  f"from its artifact.json); rerun to recompute {artifact.stage}")
            os.utime(target, ns=(record.mtime_ns, record.mtime_ns))
        return artifact

    # -- writing -----------------------------------------------------------------------------------------------
    def prepare(self, stage: str, key: str, keep_partial: bool) -> Path:
        """The local working directory for an unfinished stage.

        Leftovers of an interrupted attempt are removed unless the stage resumes from them (training). A finished
        artifact is never handed out for writing.
        """
        if self.verified_artifact(stage, key) is not None:
            raise FileExistsError(f"{self.remote_dir(stage, key)} is finished; refusing to write into it")
        if self.fs.exists(f"{self.remote_dir(stage, key)}/{MANIFEST}"):
            self._quarantine(stage, key)
        work = self.local_dir(stage, key)
        if work.exists() and not keep_partial:
            shutil.rmtree(work)
        elif work.exists():
            # A killed atomic_file write is never progress: left there, finish() would record it in the artifact.
            for stale in work.rglob(f".*{TMP_SUFFIX}"):
                if stale.is_file():
                    stale.unlink()
        work.mkdir(parents=True, exist_ok=True)
        return work

    def set_aside(self, stage: str, key: str) -> None:
        """Quarantine a finished artifact whose outside effect is gone (StageSpec.still_valid), so it reruns."""
        self._quarantine(stage, key)

    def _quarantine(self, stage: str, key: str) -> None:
        """Move a finished-but-broken artifact aside (never delete it) so the stage can be recomputed."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = f"{self.root}/{stage}/.quarantine/{key}.{stamp}"
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.remote_dir(stage, key), target)
        else:
            self.fs.mv(f"{self.remote_dir(stage, key)}/{MANIFEST}", f"{target}/{MANIFEST}")

    def finish(self, artifact: Artifact) -> Artifact:
        """Record every file in the working directory, upload if remote, then write artifact.json last."""
        base = Path(artifact.path)
        files: dict[str, FileRecord] = {}
        for path in sorted(p for p in base.rglob("*") if p.is_file() and p.name != MANIFEST):
            stat = path.stat()
            files[str(path.relative_to(base))] = FileRecord(stat.st_size, sha256_file(path), stat.st_mtime_ns)
        artifact.files = files
        payload = json.dumps(artifact.to_json(), indent=2, sort_keys=True)
        if self.is_local:
            with atomic_file(base / MANIFEST, "w") as handle:
                handle.write(payload)
            return artifact
        remote = self.remote_dir(artifact.stage, artifact.key)
        for name in files:
            self.fs.put_file(str(base / name), f"{remote}/{name}")
        # Object stores write a whole object per PUT: the manifest appears complete or not at all.
        with self.fs.open(f"{remote}/{MANIFEST}", "w") as handle:
            handle.write(payload)
        return artifact

    def list_stage(self, stage: str) -> list[str]:
        """Keys of finished artifacts of one stage."""
        try:
            entries = self.fs.ls(f"{self.root}/{stage}", detail=False)
        except FileNotFoundError:
            return []
        keys = [str(entry).rstrip("/").rsplit("/", 1)[-1] for entry in entries]
        return sorted(k for k in keys if self.read_artifact(stage, k) is not None)


def _intact(path: Path, record: FileRecord, deep: bool) -> bool:
    """Size matches, and the content too where the mtime moved since it was recorded (or ``deep``)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != record.size:
        return False
    return not (deep or stat.st_mtime_ns != record.mtime_ns) or sha256_file(path) == record.sha256


def default_store_url() -> str:
    """Where artifacts go when no --store is given: FINETUNE_STORE, else .store/ in the checkout."""
    return os.environ.get("FINETUNE_STORE", str(REPO_ROOT / ".store"))


def scratch_root() -> Path:
    return Path(os.environ.get("FINETUNE_SCRATCH", Path.home() / ".cache" / "finetune-scratch"))


class atomic_file:
    """Write to a temp file beside ``path`` and rename it into place on success; remove it on failure.

    ``exclusive``: never replace an existing ``path`` (FileExistsError instead): the temp file is hard-linked into
    place, which the kernel refuses atomically when the name is taken."""

    def __init__(self, path: Path, mode: str = "wb", exclusive: bool = False):
        self.path = Path(path)
        self.mode = mode
        self.exclusive = exclusive

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=TMP_SUFFIX, dir=self.path.parent)
        self.handle = os.fdopen(fd, self.mode)
        return self.handle

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            self.handle.close()
            if exc_type is None:
                (os.link if self.exclusive else os.replace)(self.tmp, self.path)
        except OSError as failure:
            exc = failure
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        if isinstance(exc, OSError) and str(self.path) not in str(exc):
            raise _with_cause(exc, self.path) from exc
        if exc is not None and exc_type is None:
            raise exc


def _with_cause(exc: OSError, path: Path) -> OSError:
    """Name the file, and a full disk as such: numpy's short writes raise OSError with no errno at all."""
    code = exc.errno
    if code is None and shutil.disk_usage(path.parent).free < (1 << 20):
        code = errno.ENOSPC
    if code is None:
        return OSError(f"{exc} while writing {path}")
    return OSError(code, f"{os.strerror(code)} while writing {path}" + ("" if code == exc.errno else f" ({exc})"))


def unique_name(prefix: str, suffix: str) -> str:
    """``<prefix>-<UTC time>-<random>``: one name per run even for runs started or finished in the same second
    (run logs, run records); the time first keeps a listing in time order."""
    return f"{prefix}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}{suffix}"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def hash_local_or_remote(url: str) -> str:
    """sha256 of a file at a local path or fsspec URL."""
    with fsspec.open(url, "rb") as handle:
        return sha256_stream(handle)
