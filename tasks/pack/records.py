"""Records to chat messages: validate chat / alpaca records and account for the bad ones.

A bad record is reported with its place (``file:line``) and what is wrong. Per ``data.on_bad_record`` it either
fails the stage at once (PermanentError) or is dropped and counted by reason, with the first few examples logged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from finetune.stage import PermanentError

Messages = list[dict[str, str]]
# Reasons a record is dropped (the keys of the 'dropped' metrics).
INVALID_JSON = "invalid_json"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_TEXT = "empty_text"
NO_ASSISTANT = "no_assistant_turn"
TEMPLATE_ERROR = "template_error"
TOO_LONG = "too_long"
EXAMPLES_KEPT = 5


class BadRecord(ValueError):
    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason, self.problem = reason, problem


class BadRecords:
    """Drops (counting per reason, keeping the first examples) or fails, as ``data.on_bad_record`` says."""

    def __init__(self, mode: Literal["drop", "fail"], log: Callable[[str], None]):
        self.mode, self.log = mode, log
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def report(self, location: str, bad: BadRecord) -> None:
        message = f"{location}: {bad.problem}"
        if self.mode == "fail":
            raise PermanentError(f"bad record at {message} (set data.on_bad_record: drop to skip such records)")
        self.counts[bad.reason] += 1
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(message)
            self.log(f"dropped bad record {message}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def to_messages(value: Any, data_format: Literal["chat", "alpaca"]) -> Messages:
    """The record as chat messages, or BadRecord saying which field is wrong."""
    if not isinstance(value, dict):
        raise BadRecord(WRONG_TYPE, f"record is {_kind(value)}, expected a JSON object")
    messages = _chat(value) if data_format == "chat" else _alpaca(value)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(NO_ASSISTANT, "no assistant message: nothing to learn from this record")
    return messages


def _chat(record: dict[str, Any]) -> Messages:
    messages = record.get("messages")
    if messages is None:
        raise BadRecord(MISSING_FIELD, "missing field 'messages' (chat format: {\"messages\": [{role, content}]})")
    if not isinstance(messages, list):
        raise BadRecord(WRONG_TYPE, f"'messages' is {_kind(messages)}, expected a list")
    if not messages:
        raise BadRecord(EMPTY_TEXT, "'messages' is empty")
    out: Messages = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord(WRONG_TYPE, f"messages[{index}] is {_kind(message)}, expected an object")
        out.append({name: _text(message, name, f"messages[{index}].{name}") for name in ("role", "content")})
    return out


def _alpaca(record: dict[str, Any]) -> Messages:
    instruction = _text(record, "instruction", "instruction")
    output = _text(record, "output", "output")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRecord(WRONG_TYPE, f"'input' is {_kind(extra)}, expected a string")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _text(record: dict[str, Any], name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        raise BadRecord(MISSING_FIELD, f"missing field '{where}'")
    if not isinstance(value, str):
        raise BadRecord(WRONG_TYPE, f"'{where}' is {_kind(value)}, expected a string")
    if not value.strip():
        raise BadRecord(EMPTY_TEXT, f"'{where}' is empty")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
