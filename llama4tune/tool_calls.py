"""Tool calls as training data, in one format: vLLM's ``llama4_pythonic`` (serve with
``--enable-auto-tool-choice --tool-call-parser llama4_pythonic``).

Why pythonic rather than ``llama4_json``: vLLM's llama4_json parser (Llama3JsonToolParser) finds calls with a regex
that admits one level of braces inside a call, so an argument that is itself an object is cut apart, and it reads a
reply's text before the JSON as nothing; the pythonic parser parses the whole reply with ``ast`` (nested lists and
dicts are fine) and also accepts Llama 4's ``<|python_start|>`` wrapper. What it reads (vllm/entrypoints/openai/
tool_parsers/llama4_pythonic_tool_parser.py): a reply that *is* ``[name(arg=literal, ...), ...]``, names matching
``[a-zA-Z]+\\w*``, values Python literals. So:

- an assistant turn with calls becomes exactly that list (values rendered as Python literals: JSON strings and
  numbers, True/False/None, dicts and lists of those);
- tool results stay ``tool``/``ipython`` turns (masked: they are prompt, not reply);
- tool definitions go into the system message after a short fixed preamble (masked too), as vLLM's pythonic template
  does with a user-given system prompt, as one compact JSON list of the function objects (vLLM's template indents
  them by 4: twice the tokens);
- a call this parser could not read back (a name or argument name that is no Python identifier, arguments that are
  no JSON object, text beside the calls) drops the record with reason ``unrenderable_tool_call``.

The model's own template then renders plain messages, so the hub template's JSON tool format (which double-encodes
``arguments`` given as a string and iterates a null content) never sees a call; the embedded template renders the
same strings from OpenAI-shaped messages (``tools``, ``tool_calls``), which is what vLLM hands it when serving.
"""

from __future__ import annotations

import json
import keyword
import math
import re
from typing import Any

TOOL_CALL_PARSER = "llama4_pythonic"
SERVE_FLAGS = ("--enable-auto-tool-choice", "--tool-call-parser", TOOL_CALL_PARSER)
# Short on purpose: every training example with tools carries it, and a small model's context is small (tiny-cpu: 256).
TOOLS_PREAMBLE = "Functions (call as [name(arg=value, ...)]):\n"
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # the parser's [a-zA-Z]+\w*, ASCII only


class Unrenderable(ValueError):
    """A tool call the llama4_pythonic parser could not read back; the message says why."""


def render_calls(calls: list[Any], where: str) -> str:
    """``[name(arg=value, ...), ...]`` for OpenAI ``tool_calls`` items or ``{name, arguments}`` objects."""
    if not calls:
        raise Unrenderable(f"'{where}' is an empty list of tool calls")
    return "[" + ", ".join(_render_call(call, f"{where}[{index}]") for index, call in enumerate(calls)) + "]"


def _render_call(call: Any, where: str) -> str:
    if not isinstance(call, dict):
        raise Unrenderable(f"'{where}' is not a tool call object")
    function = call.get("function", call)  # OpenAI nests {name, arguments} under "function"
    if not isinstance(function, dict):
        raise Unrenderable(f"'{where}.function' is not an object")
    name = function.get("name")
    if not isinstance(name, str) or not _is_identifier(name):
        raise Unrenderable(f"'{where}' calls {name!r}: llama4_pythonic reads only function names that are Python "
                           "identifiers")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise Unrenderable(f"'{where}' arguments are not JSON ({exc.msg})") from None
    if not isinstance(arguments, dict):
        raise Unrenderable(f"'{where}' arguments are {type(arguments).__name__}, expected a JSON object")
    for argument in arguments:
        if not _is_identifier(argument):
            raise Unrenderable(f"'{where}' argument {argument!r} is no Python identifier, so llama4_pythonic "
                               "cannot read it back")
    return f"{name}(" + ", ".join(f"{key}={python_literal(value)}" for key, value in arguments.items()) + ")"


def _is_identifier(name: str) -> bool:
    return bool(_IDENTIFIER.fullmatch(name)) and not keyword.iskeyword(name)


def python_literal(value: Any) -> str:
    """A JSON value as the Python literal ``ast`` reads back to the same value (and the embedded template writes)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise Unrenderable(f"argument value {value!r} has no Python literal")
    if isinstance(value, (str, int, float)):
        return json.dumps(value, ensure_ascii=False)  # a JSON string or number is a Python literal of that value
    if isinstance(value, list):
        return "[" + ", ".join(python_literal(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {python_literal(v)}"
                               for k, v in value.items()) + "}"
    raise Unrenderable(f"value {value!r} has no JSON type")


def tool_definitions(tools: Any, where: str) -> list[dict[str, Any]]:
    """Tool definitions in OpenAI's shape (``{"type": "function", "function": {...}}``); a JSON string is parsed
    (ShareGPT sets store ``tools`` as one)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else []
        except json.JSONDecodeError as exc:
            raise Unrenderable(f"'{where}' is a string that is not JSON ({exc.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise Unrenderable(f"'{where}' must be a list of tool definition objects")
    return [tool if "function" in tool else {"type": "function", "function": tool} for tool in tools]


def system_with_tools(system: str | None, tools: list[dict[str, Any]]) -> str:
    """The system message that carries the tool definitions (the embedded template builds the same)."""
    listing = TOOLS_PREAMBLE + json.dumps([tool["function"] for tool in tools], ensure_ascii=False)
    return f"{system.strip()}\n{listing}" if system and system.strip() else listing


def tool_result(value: Any) -> str:
    """A tool's output as text: a string as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
