"""Where training data comes from, read as records that know their file and line.

Sources (``data.source`` in the profile):
- a local file or directory of ``.jsonl`` / ``.json`` / ``.parquet`` files (relative paths from the repo root);
- any fsspec URL of such a file or directory (``s3://bucket/chat/``, ``gs://...``, ``memory://...``);
- ``hf://datasets/<name>``: a dataset on the Hugging Face hub, read with ``datasets.load_dataset`` at ``data.revision``.

A directory's files are assigned to splits by name: ``train.jsonl``, ``train-00000-of-00002.parquet`` and
``train/part-1.jsonl`` all belong to ``train``; a directory whose files name no split is all training data. A single
file is the training split.

The fingerprint is the identity of the content (file hashes, or the hub revision), never of the path or the profile's
wording, so one changed byte re-keys the pack stage and a moved directory or a new comment does not.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from finetune.hashing import sha256_stream
from finetune.profile import COMMIT_SHA, resolve_repo_path
from finetune.stage import PermanentError
from finetune.text_encoding import guess_encoding, non_utf8_encoding

HUB_PREFIX = "hf://datasets/"
SUFFIXES = (".jsonl", ".json", ".parquet")
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")
KNOWN_SPLITS = ("train", "test", *VALIDATION_SPLITS)
_PARQUET_BATCH = 8192


@dataclass(frozen=True)
class Record:
    """One raw record. ``value`` is the parsed object, or None when the raw text could not be parsed (``error``)."""

    file: str
    position: int | str
    """Its line (JSON lines), ``row N`` (parquet, hub) or ``record N`` (a JSON array) in ``file``."""
    value: Any
    error: str | None = None
    raw: str | None = None
    """The text that could not be parsed (for ``error``), as far as it decodes."""
    error_reason: str = "invalid_json"
    """The drop reason ``error`` counts under: ``invalid_json`` or ``not_utf8``."""

    @property
    def location(self) -> str:
        """Where it came from, for messages: ``path:line``, ``path:row N``, ``path:record N``."""
        return f"{self.file}:{self.position}"


class DataSource(Protocol):
    def splits(self) -> list[str]: ...

    def records(self, split: str) -> Iterator[Record]: ...

    def first(self, split: str) -> Iterator[Record]:
        """The split's records from its start, fetching no more than is read (a rehearsal's sample)."""
        ...

    def fingerprint(self) -> dict[str, Any]: ...


def open_source(source: str, revision: str | None = None, train_split: str = "train") -> DataSource:
    """The data source a profile's ``data.source`` names."""
    if source.startswith(HUB_PREFIX):
        name = source.removeprefix(HUB_PREFIX).strip("/")
        if not name:
            raise PermanentError(f"data.source {source!r} names no dataset; use hf://datasets/<owner>/<name>")
        return HubSource(name, revision)
    url = source if "://" in source else str(resolve_repo_path(source))
    return FileSource(url, train_split)


def validation_split(source: DataSource) -> str | None:
    """The source's validation split under any of its usual names, or None."""
    available = set(source.splits())
    return next((name for name in VALIDATION_SPLITS if name in available), None)


@dataclass
class FileSource:
    """JSON lines / JSON / parquet files at a local path or fsspec URL."""

    url: str
    train_split: str = "train"
    _files: dict[str, list[str]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/") or "/"

    def display(self, path: str) -> str:
        """A path as the user wrote it: plain for local files, with its protocol for remote ones."""
        return path if isinstance(self.fs, LocalFileSystem) else self.fs.unstrip_protocol(path)

    def files_by_split(self) -> dict[str, list[str]]:
        if self._files is None:
            self._files = self._assign_splits()
        return self._files

    def _assign_splits(self) -> dict[str, list[str]]:
        if not self.fs.exists(self.root):
            raise PermanentError(f"data.source {self.url}: no such file or directory")
        if self.fs.isfile(self.root):
            if not self.root.endswith(SUFFIXES):
                raise PermanentError(f"data.source {self.url}: expected a {', '.join(SUFFIXES)} file")
            return {self.train_split: [self.root]}
        files = sorted(p for p in self.fs.find(self.root) if p.endswith(SUFFIXES) and not _hidden(p, self.root))
        if not files:
            raise PermanentError(f"data.source {self.url}: directory holds no {', '.join(SUFFIXES)} files")
        names = (self.train_split, *KNOWN_SPLITS)
        named = {path: _split_of(path[len(self.root):], names) for path in files}
        if all(split is None for split in named.values()):
            return {self.train_split: files}
        unnamed = [self.display(path) for path, split in named.items() if split is None]
        if unnamed:
            raise PermanentError(
                f"data.source {self.url}: cannot tell which split {unnamed[0]} belongs to; name files "
                f"<split>.jsonl / <split>-*.parquet or put them under <split>/ (splits: {', '.join(names)})"
            )
        by_split: dict[str, list[str]] = {}
        for path, split in named.items():
            by_split.setdefault(str(split), []).append(path)
        return by_split

    def splits(self) -> list[str]:
        return list(self.files_by_split())

    def records(self, split: str) -> Iterator[Record]:
        for path in self.files_by_split().get(split, []):
            if path.endswith(".parquet"):
                yield from self._parquet_records(path)
            else:
                yield from self._json_records(path)

    def first(self, split: str) -> Iterator[Record]:
        return self.records(split)  # read file by file, line by line (parquet: batch by batch)

    def _json_records(self, path: str) -> Iterator[Record]:
        shown = self.display(path)
        with self.fs.open(path, "rb") as handle:
            head = handle.read(4096).removeprefix(codecs.BOM_UTF8)  # editors on Windows write a UTF-8 BOM
            if (encoding := non_utf8_encoding(head)) is not None:
                # Read line by line it would be dropped a line at a time as 'unparsable JSON', naming nothing.
                raise PermanentError(f"data file {shown} is not UTF-8 text: it looks like {encoding}; JSON must be "
                                     "UTF-8 (re-encode it, e.g. iconv -f <encoding> -t UTF-8)")
            handle.seek(0)
            if path.endswith(".json") and head.lstrip().startswith(b"["):
                yield from _json_array_records(shown, handle.read())
                return
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue  # blank lines (a trailing newline run) carry no record
                try:
                    yield Record(shown, lineno, json.loads(line))
                except UnicodeDecodeError as exc:
                    yield Record(shown, lineno, None, f"not UTF-8 text (byte 0x{line[exc.start]:02x} at column "
                                 f"{exc.start + 1}; this line looks like {guess_encoding(line)})",
                                 line.decode("utf-8", "replace"), "not_utf8")
                except json.JSONDecodeError as exc:
                    yield Record(shown, lineno, None, f"unparsable JSON ({_reason(exc)})",
                                 line.decode("utf-8", "replace"))

    def _parquet_records(self, path: str) -> Iterator[Record]:
        import pyarrow.parquet as pq

        shown = self.display(path)
        with self.fs.open(path, "rb") as handle:
            row = 0
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=_PARQUET_BATCH):
                for value in batch.to_pylist():
                    row += 1
                    yield Record(shown, f"row {row}", value)

    def fingerprint(self) -> dict[str, Any]:
        files: dict[str, str] = {}
        for split, paths in self.files_by_split().items():
            for path in paths:
                with self.fs.open(path, "rb") as handle:
                    # Relative names: they decide the split, while the directory's own location does not matter.
                    files[path[len(self.root):].lstrip("/") or path.rsplit("/", 1)[-1]] = sha256_stream(handle)
        return {"kind": "files", "splits": {s: len(p) for s, p in self.files_by_split().items()}, "files": files}


@dataclass
class HubSource:
    """A dataset on the Hugging Face hub, pinned to a commit; read through the ``datasets`` library."""

    name: str
    revision: str | None

    def splits(self) -> list[str]:
        import datasets

        return list(datasets.get_dataset_split_names(self.name, revision=self.revision))

    def records(self, split: str) -> Iterator[Record]:
        return self._rows(split, streaming=False)

    def first(self, split: str) -> Iterator[Record]:
        return self._rows(split, streaming=True)  # fetches the shards it reads, not the split

    def _rows(self, split: str, streaming: bool) -> Iterator[Record]:
        import datasets

        rows = datasets.load_dataset(self.name, revision=self.revision, split=split, streaming=streaming)
        where = f"{HUB_PREFIX}{self.name}@{self.revision}" if self.revision else f"{HUB_PREFIX}{self.name}"
        for row, value in enumerate(rows, start=1):
            yield Record(f"{where}:{split}", f"row {row}", value)

    def fingerprint(self) -> dict[str, Any]:
        # Only a commit pins content: a branch or tag can move under the same name and a stale pack would be reused.
        if not self.revision or not COMMIT_SHA.match(self.revision):
            raise PermanentError(
                f"data.revision must pin {HUB_PREFIX}{self.name} to a 40-hex commit sha, got {self.revision!r}; "
                "find it on the dataset's 'Files and versions' tab or with `huggingface_hub.dataset_info`"
            )
        return {"kind": "hub", "dataset": self.name, "revision": self.revision}


def _hidden(path: str, root: str) -> bool:
    return any(part.startswith((".", "_")) for part in path[len(root):].split("/") if part)


def _split_of(relative: str, names: tuple[str, ...]) -> str | None:
    """The split a file belongs to: the first directory or file-name stem (before '-' or '.') that names one."""
    parts = [p for p in relative.split("/") if p]
    candidates = [*parts[:-1], parts[-1].split(".", 1)[0].split("-", 1)[0]]
    return next((c for c in candidates if c in names), None)


def _json_array_records(shown: str, raw: bytes) -> Iterator[Record]:
    try:
        rows = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        # One broken array loses every record in it, so no mode can drop just the bad one.
        line = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise PermanentError(f"{shown}{line}: unparsable JSON array ({_reason(exc)})") from None
    for number, value in enumerate(rows, start=1):
        yield Record(shown, f"record {number}", value)


def _reason(exc: Exception) -> str:
    return exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
