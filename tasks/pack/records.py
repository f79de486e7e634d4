"""Records to chat messages: validate chat / ShareGPT / alpaca records and account for the bad ones.

A bad record is reported with its place (``file:line``) and what is wrong. Per ``data.on_bad_record`` it either
fails the stage at once (PermanentError) or is dropped: counted by reason, the first few logged, and every one
written to the pack artifact's drops file (``DROPS_FILE``, one JSON line per record: split, file, line, reason,
problem, excerpt), so none is lost to a count.

Tool calls (OpenAI ``tool_calls`` / legacy ``function_call`` on assistant messages, ``tool``/``function`` results,
a record's ``tools``; ShareGPT ``function_call`` / ``observation`` turns) become plain messages in one format,
vLLM's llama4_pythonic (llama4tune/tool_calls.py): a call the parser could not read back drops the record.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import IO, Any, Literal

from finetune.data_sources import Record
from finetune.profile import DataFormat
from finetune.stage import PermanentError
from llama4tune.tool_calls import Unrenderable, render_calls, system_with_tools, tool_definitions, tool_result

Messages = list[dict[str, str]]
# Reasons a record is dropped (the keys of the 'dropped' metrics; a line that does not parse is dropped as
# finetune.data_sources says: invalid_json or not_utf8).
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_TEXT = "empty_text"
NO_ASSISTANT = "no_assistant_turn"
TEMPLATE_ERROR = "template_error"
TOO_LONG = "too_long"
UNKNOWN_ROLE = "unknown_role"
NON_TEXT = "non_text_content"
TOOL_CALL = "unrenderable_tool_call"
EXAMPLES_KEPT = 5
"""Drops logged and kept in the metrics; the drops file has them all."""
EXCERPT_CHARS = 160
DROPS_FILE = "dropped.jsonl"
# Roles the Llama 4 chat template knows (`ipython` is its name for tool output); it would render any other string.
# OpenAI's legacy `function` role is a tool result.
CHAT_ROLES = {role: role for role in ("system", "user", "assistant", "tool", "ipython")} | {"function": "tool"}
# ShareGPT speakers (`from`) to roles: torchtune's ShareGPTToMessages map, plus the tool-output speakers published
# ShareGPT sets use (`tool`, `function`, LLaMA-Factory's `observation`) and its `function_call` (an assistant call).
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant", "function_call": "assistant",
                  "tool": "tool", "function": "tool", "observation": "tool"}
# A field only one record shape has, to name the data.format a misformatted record looks like.
SHAPE_FIELDS = {"messages": "chat", "conversations": "sharegpt", "instruction": "alpaca"}


class BadRecord(ValueError):
    def __init__(self, reason: str, problem: str):
        super().__init__(problem)
        self.reason, self.problem = reason, problem


class BadRecords:
    """Drops (counting per reason, writing each to ``sink``, keeping the first examples) or fails, as
    ``data.on_bad_record`` says."""

    def __init__(self, mode: Literal["drop", "fail"], log: Callable[[str], None], sink: IO[str] | None = None,
                 split: str = "train"):
        self.mode, self.log, self.sink, self.split = mode, log, sink, split
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def report(self, record: Record, bad: BadRecord) -> None:
        message = f"{record.location}: {bad.problem}"
        if self.mode == "fail":
            raise PermanentError(f"bad record at {message} (set data.on_bad_record: drop to skip such records)")
        self.counts[bad.reason] += 1
        if self.sink is not None:
            self.sink.write(json.dumps({"split": self.split, "file": record.file, "line": record.position,
                                        "reason": bad.reason, "problem": bad.problem,
                                        "excerpt": excerpt(record)}, ensure_ascii=False) + "\n")
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(message)
            self.log(f"dropped bad record {message}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def drop_notice(splits: dict[str, dict[str, Any]], path: Any, shown: int = 3) -> str:
    """One line for the console and the run report: how many records were dropped and why, where the first are, and
    the file that lists them all."""
    read = sum(stats["samples"] for stats in splits.values())
    reasons: Counter[str] = Counter()
    for stats in splits.values():
        reasons.update(stats["dropped_by_reason"])
    examples = [example for stats in splits.values() for example in stats["dropped_examples"]]
    first = ", ".join(example.split(": ", 1)[0] for example in examples[:shown])
    why = ", ".join(f"{reason} {count}" for reason, count in reasons.most_common())
    return f"{sum(reasons.values())} of {read} records dropped ({why}); first at {first}; all in {path}"


def excerpt(record: Record) -> str:
    """The record's start as text, to recognise it by in the drops file."""
    text = record.raw if record.value is None and record.raw is not None else json.dumps(record.value,
                                                                                         ensure_ascii=False)
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS - 3] + "..."


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
    return _with_tools(record, _conversation(record, "messages", "role", "content", CHAT_ROLES,
                                             "chat format: {\"messages\": [{role, content}]}"))


def _sharegpt(record: dict[str, Any]) -> Messages:
    # LLaMA-Factory's ShareGPT shape carries the system prompt beside the turns.
    system = [{"role": "system", "content": _text(record, "system", "system")}] if record.get("system") else []
    return _with_tools(record, system + _conversation(record, "conversations", "from", "value", SHAREGPT_ROLES,
                                                      "sharegpt format: {\"conversations\": [{from, value}]}"))


def _with_tools(record: dict[str, Any], messages: Messages) -> Messages:
    """The record's tool definitions (``tools``) moved into the system message, where they are masked."""
    if not record.get("tools"):
        return messages
    try:
        tools = tool_definitions(record["tools"], "tools")
    except Unrenderable as exc:
        raise BadRecord(TOOL_CALL, f"tool definitions cannot be rendered: {exc}") from None
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": system_with_tools(messages[0]["content"], tools)}, *messages[1:]]
    return [{"role": "system", "content": system_with_tools(None, tools)}, *messages]


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
        out.append({"role": roles[speaker], "content": _turn_content(turn, speaker, roles[speaker], content_key,
                                                                     where)})
    return out


def _turn_content(turn: dict[str, Any], speaker: str, role: str, content_key: str, where: str) -> str:
    """A turn's text: its content, a tool result as text, or its tool calls rendered for llama4_pythonic."""
    calls = _tool_calls(turn, speaker, content_key, where)
    if calls is not None:
        text = turn.get(content_key) if speaker != "function_call" else None
        if isinstance(text, str) and text.strip() or isinstance(text, list) and text:
            raise BadRecord(TOOL_CALL, f"'{where}' has text beside its tool calls; llama4_pythonic reads a reply "
                                       "only when it is the call list alone")
        try:
            return render_calls(*calls)
        except Unrenderable as exc:
            raise BadRecord(TOOL_CALL, f"tool call cannot be rendered for llama4_pythonic: {exc}") from None
    value = turn.get(content_key)
    if role in ("tool", "ipython") and value is not None and not isinstance(value, list):
        return tool_result(value)  # a tool may return nothing, or JSON
    return _content(value, f"{where}.{content_key}")


def _tool_calls(turn: dict[str, Any], speaker: str, content_key: str, where: str) -> tuple[list[Any], str] | None:
    """The turn's tool calls and where they are: OpenAI ``tool_calls`` (or the legacy ``function_call``) on an
    assistant message, or a ShareGPT ``function_call`` turn whose value is the call(s) as JSON."""
    if speaker == "function_call":
        value = turn.get(content_key)
        try:
            parsed = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as exc:
            raise BadRecord(TOOL_CALL, f"'{where}.{content_key}' is not a JSON tool call ({exc.msg})") from None
        return (parsed if isinstance(parsed, list) else [parsed]), f"{where}.{content_key}"
    if turn.get("tool_calls"):
        calls = turn["tool_calls"]
        return (calls if isinstance(calls, list) else [calls]), f"{where}.tool_calls"
    if turn.get("function_call"):
        return [turn["function_call"]], f"{where}.function_call"
    return None


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
