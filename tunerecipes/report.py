"""The machine-readable lines a recipe prints, and their parser (used by the train stage; no torch here).

Rank 0 prints one ``tune-metrics: {json}`` line per logged step and, when it stops on a known bad input, one
``tune-error: {json}`` line naming what to fix. Everything else a trainer prints is free text for humans.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

METRICS_PREFIX = "tune-metrics: "
ERROR_PREFIX = "tune-error: "


class RecipeError(RuntimeError):
    """A failure whose cause is the run's input or configuration, so retrying cannot fix it.

    ``kind`` is one of: config, vocab_mismatch, missing_checkpoint, nan_loss, out_of_memory.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def emit_metrics(record: dict[str, Any]) -> None:
    _write_line(sys.stdout, METRICS_PREFIX + json.dumps(record, sort_keys=True))


def emit_error(error: RecipeError) -> None:
    _write_line(sys.stderr, ERROR_PREFIX + json.dumps({"kind": error.kind, "message": str(error)}))


def _write_line(stream: TextIO, text: str) -> None:
    # One write, newline included: every rank shares the launcher's pipe, and unbuffered (PYTHONUNBUFFERED) print()
    # writes the text and its newline separately, so two ranks' lines interleaved into one unparsable line.
    stream.write(text + "\n")
    stream.flush()


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
