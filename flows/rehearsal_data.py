"""A rehearsal's data: the first records of the profile's own sources when this machine can read them.

A rehearsal trains a few steps, so it needs a few hundred records, not the dataset; but they should be the user's
records, in the user's format, so that the pack stage meets what production will (a field named differently, a
split of another name, records the chat template refuses). Each source of ``data.source`` / ``data.sources`` is read
through the pack stage's own reader (finetune/data_sources.py) up to ``DATA_RECORDS`` records of its training
split, written as JSON lines next to the rehearsal's logs, and the rehearsal's profile points at those files. A
source that cannot be read here (no credentials, no network), or is still the shipped placeholder, leaves the
rehearsal on the embedded default's data, and the report says why.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data_sources import open_source
from finetune.preflight.data import PLACEHOLDER
from finetune.profile import DataConfig, ResolvedSource

DATA_RECORDS = 256
"""Records read from the start of each source: a 30-step rehearsal of 16 processes takes 480 sequences, packed."""
READ_TIMEOUT_S = 120.0
"""How long one source may take to give its first records before it counts as unreachable."""


@dataclass(frozen=True)
class DataSample:
    """The first records of every source (``overrides`` points the profile at them), or why they are not used."""

    overrides: dict[str, Any]
    """data.* field -> the rehearsal's value; empty when a source could not be read."""
    why: str


def sample_sources(data: DataConfig, out_dir: Path, count: int = DATA_RECORDS,
                   timeout_s: float = READ_TIMEOUT_S) -> DataSample:
    """Write the first ``count`` records of each source's training split under ``out_dir``."""
    sources = data.all_sources()
    written: list[tuple[ResolvedSource, Path, int]] = []
    for index, source in enumerate(sources):
        path = out_dir / f"source-{index}.jsonl"
        if PLACEHOLDER.search(source.source):  # never ask a bucket that is only a name in the shipped profile
            return DataSample({}, f"{source.field} {source.source} is the shipped placeholder: give yours with "
                                  f"{source.field}=... to rehearse on its first records")
        try:
            records = _first_records(source, count, timeout_s)
        except Exception as exc:  # whatever reading it raises here (no such bucket, no credentials, no network)
            return DataSample({}, f"{source.field} {source.source} cannot be read from here "
                                  f"({type(exc).__name__}: {str(exc)[:300]})")
        if not records:
            return DataSample({}, f"{source.field} {source.source}: no readable record in its "
                                  f"'{source.train_split}' split")
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(record, default=str) + "\n" for record in records))
        written.append((source, path, len(records)))
    read = ", ".join(f"{n} of {source.source}" for source, _, n in written)
    why = f"the first records of the profile's own data ({read}): a rehearsal trains a few steps"
    if data.source is not None:
        return DataSample({"data.source": str(written[0][1]), "data.revision": None}, why)
    mix = [{"source": str(path), "weight": source.weight, "format": source.format, "train_split": source.train_split}
           for source, path, _ in written]
    return DataSample({"data.sources": mix}, why)


def _first_records(source: ResolvedSource, count: int, timeout_s: float) -> list[Any]:
    """The parsed values of the first ``count`` records of the source's training split (unparsable ones skipped:
    the pack stage drops or refuses them the same way on the full data). Read in a thread bounded by
    ``timeout_s``: an unreachable bucket or hub can retry for minutes."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def read() -> None:
        try:
            opened = open_source(source.source, source.revision, source.train_split)
            valid = (record.value for record in opened.first(source.train_split) if record.error is None)
            result.extend(itertools.islice(valid, count))
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    reader = threading.Thread(target=read, daemon=True, name=f"rehearsal-data-{source.field}")
    reader.start()
    reader.join(timeout_s)
    if reader.is_alive():
        raise TimeoutError(f"no records after {timeout_s:g} s")
    if failure:
        raise failure[0]
    return result
