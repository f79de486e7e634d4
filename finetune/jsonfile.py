"""One JSON object read from a file or a JSONL line, failing once with the file, the line and what was expected.

Every stage reads JSON it did not write (a checkpoint's config.json, a tokenizer config, pack's prompts.jsonl): a
file that does not parse now never will, so the error is permanent and names where to look.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.stage import PermanentError


def json_object(text: str, where: str, expected: str = "a JSON object") -> dict[str, Any]:
    """``text`` parsed as one JSON object; ``where`` is the file (or ``file:line`` of a JSONL record)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # A line number helps inside a multi-line file; a JSONL record's ``where`` names its line already.
        at = f" at line {exc.lineno}" if "\n" in text.strip() else ""
        raise PermanentError(f"{where}: invalid JSON{at}: {exc.msg}") from None
    if not isinstance(value, dict):
        raise PermanentError(f"{where}: must be {expected}, got {type(value).__name__}")
    return value


def read_json_object(path: Path, missing: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``missing`` says what a missing file means."""
    if not path.is_file():
        raise PermanentError(f"{path}: missing; {missing}")
    return json_object(path.read_text(encoding="utf-8"), str(path))
