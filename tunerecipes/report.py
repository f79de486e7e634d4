"""The machine-readable lines a recipe prints, and their parser (used by the train stage; no torch here).

Rank 0 prints one ``tune-metrics: {json}`` line per logged step and, when it stops on a known bad input, one
``tune-error: {json}`` line naming what to fix. Everything else a trainer prints is free text for humans.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any

METRICS_PREFIX = "tune-metrics: "
ERROR_PREFIX = "tune-error: "


class RecipeError(RuntimeError):
    """A failure whose cause is the run's input or configuration, so retrying cannot fix it.

    ``kind`` is one of: config, vocab_mismatch, missing_checkpoint, nan_loss, out_of_memory.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def whole_lines() -> None:
    """Make every line this process prints reach its pipe in one write. Every rank writes into the launcher's one
    pipe, unbuffered (PYTHONUNBUFFERED): print() then writes a line and its newline apart, and two ranks' lines ran
    into one (an unparsable ``tune-error`` line hid a config error's cause from the stage). Line buffering writes each
    line in one go; the recipe calls this before anything prints."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):  # not a test's capture
            stream.reconfigure(line_buffering=True, write_through=False)


def emit_metrics(record: dict[str, Any]) -> None:
    print(METRICS_PREFIX + json.dumps(record, sort_keys=True), flush=True)


def emit_error(error: RecipeError) -> None:
    print(ERROR_PREFIX + json.dumps({"kind": error.kind, "message": str(error)}), file=sys.stderr, flush=True)


def parse_metrics(line: str) -> dict[str, Any] | None:
    """The metrics record in a log line, if it holds one (launchers may prefix lines, e.g. with a rank tag)."""
    return _payload(line, METRICS_PREFIX)


def parse_error(line: str) -> dict[str, Any] | None:
    return _payload(line, ERROR_PREFIX)


def _payload(line: str, prefix: str) -> dict[str, Any] | None:
    at = line.find(prefix)
    if at < 0:
        return None
    try:
        value = json.loads(line[at + len(prefix):])
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
