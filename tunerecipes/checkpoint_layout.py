"""The layout of a training run's output directory, and which mid-run checkpoints count (filesystem only: no torch,
so the train stage and convert can read it without importing torch). The recipe, the train stage and convert all
name these files through this module.

Output directory::

    torchtune_config.yaml   the rendered recipe config (written by the train stage)
    metrics.jsonl           one record per optimizer step (written by the recipe, rank 0)
    checkpoints.jsonl       one record per mid-run checkpoint saved: step, reason (steps|minutes|notice), seconds
    checkpoints/step_<N>/   mid-run DCP checkpoints (below); the train stage deletes them once final/ is complete
    final/                  the final checkpoint (DCP or HF) with train_meta.json, written last

Layout under the checkpoint root::

    .tmp-step_<N>/   being written (never read)
    step_<N>/        complete: renamed from its temp dir after DCP wrote ``.metadata``, which DCP writes last

A directory only counts as a checkpoint when it is named ``step_<N>`` AND holds ``.metadata``: a copy that lost
its marker, or a temp dir left by a killed run, is never resumed from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

CONFIG_FILE = "torchtune_config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_LOG = "checkpoints.jsonl"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
META_FILE = "train_meta.json"
METADATA = ".metadata"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines log the recipe appends to (metrics.jsonl, checkpoints.jsonl), oldest first; none
    if it is absent. A last line still being written (a reader following a live run) is left out."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise
    return records


def last_logged_step(output_dir: str | os.PathLike[str]) -> int:
    """The last step metrics.jsonl records (0 before the first), as a reader following a live run sees it."""
    records = read_records(Path(output_dir) / METRICS_FILE)
    return records[-1]["step"] if records else 0


def is_complete(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / METADATA).is_file()


def complete_checkpoints(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike[str]) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def saved_on_notice(output_dir: str | os.PathLike[str]) -> tuple[int | None, bool]:
    """The newest complete checkpoint's step and whether a spot notice saved it (the checkpoint log says why each
    was saved); (None, False) without one."""
    latest = latest_checkpoint(Path(output_dir) / CHECKPOINTS_DIR)
    if latest is None:
        return None, False
    reasons = {r["step"]: r["reason"] for r in read_records(Path(output_dir) / CHECKPOINT_LOG)}
    return latest[0], reasons.get(latest[0]) == "notice"


def discard(checkpoint: str | os.PathLike[str]) -> None:
    """Delete a checkpoint without ever leaving it half-deleted under its own name: ``rmtree`` removes the shards
    before ``.metadata``, so a kill mid-delete would leave a ``step_<N>`` that still counts as complete. Renamed to a
    temp name first (atomic), what a killed delete leaves is cleaned up by :func:`remove_partial` on the next start."""
    checkpoint = Path(checkpoint)
    doomed = checkpoint.with_name(TMP_PREFIX + checkpoint.name)
    if doomed.exists():  # an earlier delete of the same step that was cut short
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_partial(root: str | os.PathLike[str]) -> list[Path]:
    """Delete temp dirs left by an interrupted save (call on one rank, before anyone saves)."""
    root = Path(root)
    removed = [entry for entry in root.glob(TMP_PREFIX + "*") if entry.is_dir()] if root.is_dir() else []
    for entry in removed:
        shutil.rmtree(entry, ignore_errors=True)
    return removed
