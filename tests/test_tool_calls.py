"""Tool calls are data: OpenAI and ShareGPT tool-call records render in vLLM's llama4_pythonic format, calls are
learned, tool results and definitions masked, and the embedded template renders what vLLM hands it the same way."""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tasks.pack as pack
from embedded.tokenizer import save_tokenizer
from finetune.packed import IGNORE_INDEX
from finetune.packed_dataset import PackedDataset
from finetune.profile import load_profile
from finetune.stage import StageContext
from finetune.store import Artifact
from llama4tune.tool_calls import python_literal, render_calls
from tasks.pack.chat import load_tokenizer
from tasks.pack.records import BadRecord, to_messages

EXPECTED = Path(__file__).parent / "expected" / "tool_call_openai.txt"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "array"}},
                   "required": ["city"]}}}]
ARGUMENTS = {"city": "Paris \"centre\"", "days": [1, 2], "options": {"metric": True, "cache": None}, "t": 1.5}
# OpenAI chat-completions shape: assistant content null with tool_calls (arguments a JSON string), then a tool message.
OPENAI = {"tools": TOOLS, "messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGUMENTS)}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "21 degrees."}]}
# LLaMA-Factory's ShareGPT function-call shape of the same conversation.
SHAREGPT = {"system": "Be brief.", "tools": json.dumps(TOOLS), "conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": ARGUMENTS})},
    {"from": "observation", "value": "{\"temp\": 21}"},
    {"from": "gpt", "value": "21 degrees."}]}
CALL = '[get_weather(city="Paris \\"centre\\"", days=[1, 2], options={"metric": True, "cache": None}, t=1.5)]'

# vLLM's Llama4PythonicToolParser.extract_tool_calls (vllm/entrypoints/openai/tool_parsers/
# llama4_pythonic_tool_parser.py), restated: vLLM lives in its own environment, not this one.
_VLLM_REGEX = re.compile(r"\[([a-zA-Z]+\w*\(([a-zA-Z]+\w*=.*,\s*)*([a-zA-Z]+\w*=.*\s)?\),\s*)*([a-zA-Z]+\w*\(([a-zA-Z]+"
                         r"\w*=.*,\s*)*([a-zA-Z]+\w*=.*\s*)?\)\s*)+\]", re.DOTALL)


def _vllm_reads(output: str) -> list[tuple[str, dict[str, Any]]]:
    def value(node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Dict):
            return {k.value: value(v) for k, v in zip(node.keys, node.values)}  # type: ignore[union-attr]
        if isinstance(node, ast.List):
            return [value(v) for v in node.elts]
        raise AssertionError(f"vLLM refuses a non-literal argument: {ast.dump(node)}")

    assert _VLLM_REGEX.match(output), output
    parsed = ast.parse(output).body[0].value  # type: ignore[attr-defined]
    assert isinstance(parsed, ast.List) and all(isinstance(e, ast.Call) for e in parsed.elts)
    return [(call.func.id, {k.arg: value(k.value) for k in call.keywords}) for call in parsed.elts]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model")
    save_tokenizer(path)
    return path


def test_openai_and_sharegpt_tool_calls_normalize_to_one_conversation() -> None:
    messages = to_messages(OPENAI, "chat")
    assert messages[2] == {"role": "assistant", "content": CALL}
    assert messages[3] == {"role": "tool", "content": "{\"temp\": 21}"}
    assert messages[0]["content"].startswith("Be brief.\nFunctions (call as [name(arg=value, ...)]):\n[{")
    assert to_messages(SHAREGPT, "sharegpt") == messages


def test_a_rendered_call_is_read_back_by_vllms_llama4_pythonic_parser() -> None:
    assert _vllm_reads(CALL) == [("get_weather", ARGUMENTS)]
    two = render_calls([{"name": "a", "arguments": {}}, {"function": {"name": "b", "arguments": {"x": "é\n"}}}], "c")
    assert _vllm_reads(two) == [("a", {}), ("b", {"x": "é\n"})]
    assert ast.literal_eval(python_literal({"k": [True, None, -3, 2.5e-8, "q'\""]})) == {"k": [True, None, -3, 2.5e-8,
                                                                                             "q'\""]}


def test_the_fixed_tool_call_record_renders_to_the_checked_in_string(tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tokenizer.apply_chat_template(to_messages(OPENAI, "chat"), tokenize=False) == EXPECTED.read_text()


def test_the_embedded_template_renders_what_vllm_hands_it_as_it_was_trained(tokenizer_dir: Path) -> None:
    """vLLM passes `tools` and the messages with each call's arguments parsed into a dict (chat_utils'
    _postprocess_messages); the served prompt must be the training text."""
    served = copy.deepcopy(OPENAI["messages"])
    served[2]["tool_calls"][0]["function"]["arguments"] = ARGUMENTS
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tokenizer.apply_chat_template(served, tools=TOOLS, tokenize=False) == EXPECTED.read_text()
    prompt = tokenizer.apply_chat_template(served[:2], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert EXPECTED.read_text().startswith(prompt)


def test_calls_are_learned_and_tool_results_and_definitions_masked(tmp_path: Path, tokenizer_dir: Path) -> None:
    source = tmp_path / "data" / "train.jsonl"
    source.parent.mkdir()
    source.write_text(json.dumps(OPENAI) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(profile=load_profile("tiny-cpu", [f"data.source={source}", "data.max_seq_len=1024"]), key="k",
                       workdir=out, inputs={"download": Artifact(stage="download", key="m", path=str(tokenizer_dir))})
    metrics = pack.run(ctx)
    assert metrics["dropped"] == 0 and metrics["samples"] == 1
    tokenizer = load_tokenizer(tokenizer_dir)
    item = PackedDataset(out)[0]
    tokens, labels = np.asarray(item["tokens"]), np.asarray(item["labels"])
    learned = tokens[labels != IGNORE_INDEX].tolist()
    expected = tokenizer(CALL + "<|eot|>", add_special_tokens=False)["input_ids"] + tokenizer(
        "21 degrees.<|eot|>", add_special_tokens=False)["input_ids"]
    assert learned == expected  # the call and the answer, nothing of the tool result or the definitions
    text = tokenizer.decode(tokens[: len(tokenizer(EXPECTED.read_text(), add_special_tokens=False)["input_ids"])])
    assert text == EXPECTED.read_text()


@pytest.mark.parametrize("call,problem", [
    ({"name": "get-weather", "arguments": "{}"}, "'get-weather': llama4_pythonic reads only function names that"),
    ({"name": "f", "arguments": "{not json"}, "arguments are not JSON"),
    ({"name": "f", "arguments": "[1, 2]"}, "arguments are list, expected a JSON object"),
    ({"name": "f", "arguments": {"class": 1}}, "argument 'class' is no Python identifier"),
])
def test_a_call_vllm_could_not_read_back_drops_the_record_saying_so(call: dict, problem: str) -> None:
    record = copy.deepcopy(OPENAI)
    record["messages"][2]["tool_calls"] = [{"type": "function", "function": call}]
    with pytest.raises(BadRecord, match=re.escape(problem)) as bad:
        to_messages(record, "chat")
    assert bad.value.reason == "unrenderable_tool_call" and "cannot be rendered for llama4_pythonic" in str(bad.value)


def test_text_beside_tool_calls_is_refused_as_unreadable() -> None:
    record = copy.deepcopy(OPENAI)
    record["messages"][2]["content"] = "Let me look."
    with pytest.raises(BadRecord, match="has text beside its tool calls") as bad:
        to_messages(record, "chat")
    assert bad.value.reason == "unrenderable_tool_call"
