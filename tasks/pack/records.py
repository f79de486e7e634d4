"""Records to chat messages: validate chat / ShareGPT / alpaca records and account for the bad ones.

A bad record is reported with its place (``file:line``) and what is wrong. Per ``data.on_bad_record`` it either
fails the stage at once (PermanentError) or is dropped and counted by reason, with the first few examples logged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

from finetune.profile import DataFormat
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
UNKNOWN_ROLE = "unknown_role"
NON_TEXT = "non_text_content"
EXAMPLES_KEPT = 5
# Roles the Llama 4 chat template knows (`ipython` is its name for tool output); it would render any other string.
CHAT_ROLES = {role: role for role in ("system", "user", "assistant", "tool", "ipython")}
# ShareGPT speakers (`from`) to roles: torchtune's ShareGPTToMessages map, plus the tool-output speakers published
# ShareGPT sets use (`tool`, `function`, LLaMA-Factory's `observation`).
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant",
                  "tool": "tool", "function": "tool", "observation": "tool"}
# A field only one record shape has, to name the data.format a misformatted record looks like.
SHAPE_FIELDS = {"messages": "chat", "conversations": "sharegpt", "instruction": "alpaca"}


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


def to_messages(value: Any, data_format: DataFormat) -> Messages:
    """The record as chat messages, or BadRecord saying which field is wrong."""
    if not isinstance(value, dict):
        raise BadRecord(WRONG_TYPE, f"record is {_kind(value)}, expected a JSON object")
    messages = {"chat": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca}[data_format](value)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(NO_ASSISTANT, "no assistant message: nothing to learn from this record")
    return messages


# torchtune's OpenAIToMessages / ShareGPTToMessages (0.6.1) name these shapes but do not fit here: they fail with a
# bare KeyError on an unknown ShareGPT speaker, skip content parts of unknown types silently, fetch image URLs, have
# no `tool` role, and build Message objects while the chat template takes plain dicts. The mappings follow theirs.


def _chat(record: dict[str, Any]) -> Messages:
    return _conversation(record, "messages", "role", "content", CHAT_ROLES,
                         "chat format: {\"messages\": [{role, content}]}")


def _sharegpt(record: dict[str, Any]) -> Messages:
    # LLaMA-Factory's ShareGPT shape carries the system prompt beside the turns.
    system = [{"role": "system", "content": _text(record, "system", "system")}] if record.get("system") else []
    return system + _conversation(record, "conversations", "from", "value", SHAREGPT_ROLES,
                                  "sharegpt format: {\"conversations\": [{from, value}]}")


def _conversation(record: dict[str, Any], field: str, role_key: str, content_key: str, roles: dict[str, str],
                  shape: str) -> Messages:
    """The turns under ``field``, each's speaker (``role_key``) mapped through ``roles``, any other a bad record."""
    turns = record.get(field)
    if turns is None:
        raise BadRecord(MISSING_FIELD, f"missing field '{field}' ({shape}){_shape_hint(record)}")
    if not isinstance(turns, list):
        raise BadRecord(WRONG_TYPE, f"'{field}' is {_kind(turns)}, expected a list")
    if not turns:
        raise BadRecord(EMPTY_TEXT, f"'{field}' is empty")
    out: Messages = []
    for index, turn in enumerate(turns):
        where = f"{field}[{index}]"
        if not isinstance(turn, dict):
            raise BadRecord(WRONG_TYPE, f"{where} is {_kind(turn)}, expected an object")
        speaker = _text(turn, role_key, f"{where}.{role_key}")
        if speaker not in roles:
            raise BadRecord(UNKNOWN_ROLE, f"'{where}.{role_key}' is {speaker!r}; allowed: {', '.join(roles)}")
        out.append({"role": roles[speaker], "content": _content(turn.get(content_key), f"{where}.{content_key}")})
    return out


def _shape_hint(record: dict[str, Any]) -> str:
    """Which data.format the record looks like instead, when it carries another shape's field."""
    shape = next((fmt for field, fmt in SHAPE_FIELDS.items() if record.get(field) is not None), None)
    return f"; it looks like data.format: {shape}" if shape else ""


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI-style content parts of which only text ones can be trained on."""
    if not isinstance(value, list):
        return _text({"content": value}, "content", where)
    texts = []
    for index, part in enumerate(value):
        part_where = f"{where}[{index}]"
        if not isinstance(part, dict):
            raise BadRecord(WRONG_TYPE, f"'{part_where}' is {_kind(part)}, expected a content part object")
        kind = _text(part, "type", f"{part_where}.type")
        if kind != "text":
            raise BadRecord(NON_TEXT, f"'{part_where}' is a {kind!r} part; only text parts can be trained on")
        texts.append(_text(part, "text", f"{part_where}.text", allow_empty=True))
    # Back to back, as the Llama 4 chat template renders a list of text parts.
    joined = "".join(texts)
    if not joined.strip():
        raise BadRecord(EMPTY_TEXT, f"'{where}' is empty")
    return joined


def _alpaca(record: dict[str, Any]) -> Messages:
    if "instruction" not in record:
        raise BadRecord(MISSING_FIELD, "missing field 'instruction' (alpaca format: {instruction, input, output})"
                                       f"{_shape_hint(record)}")
    instruction = _text(record, "instruction", "instruction")
    output = _text(record, "output", "output")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise BadRecord(WRONG_TYPE, f"'input' is {_kind(extra)}, expected a string")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _text(record: dict[str, Any], name: str, where: str, allow_empty: bool = False) -> str:
    value = record.get(name)
    if value is None:
        raise BadRecord(MISSING_FIELD, f"missing field '{where}'")
    if not isinstance(value, str):
        raise BadRecord(WRONG_TYPE, f"'{where}' is {_kind(value)}, expected a string")
    if not allow_empty and not value.strip():
        raise BadRecord(EMPTY_TEXT, f"'{where}' is empty")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)
