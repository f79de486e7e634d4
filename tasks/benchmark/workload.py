"""The benchmark's load: requests drawn from pack's ``prompts.jsonl``, the same list for every model and level.

Each record is ``{"messages": [...], "prompt_tokens": n, "response_tokens": m}``. A request keeps the record's
prompt messages and asks for exactly ``m`` output tokens (capped by ``max_tokens`` and the context length), so the
benchmark reproduces the training data's prompt/response length distribution and both models generate the same
number of tokens.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.jsonfile import json_object
from finetune.stage import PermanentError

# The load is a pure function of prompts.jsonl and the profile: a fixed seed keeps reruns comparable.
WORKLOAD_SEED = 0


@dataclass(frozen=True)
class BenchRequest:
    messages: list[dict[str, str]]
    prompt_tokens: int
    output_tokens: int

    @property
    def single_user_turn(self) -> bool:
        return len(self.messages) == 1 and self.messages[0]["role"] == "user"


def _record(path: Path, lineno: int, raw: str) -> tuple[list[dict[str, str]], int, int]:
    where = f"{path}:{lineno}"
    data = json_object(raw, where, "an object with messages/prompt_tokens/response_tokens")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise PermanentError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise PermanentError(f"{where}: messages[{i}] must have string 'role' and 'content'")
    for field in ("prompt_tokens", "response_tokens"):
        value = data.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PermanentError(f"{where}: '{field}' must be a non-negative integer, got {value!r}")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return clean, data["prompt_tokens"], data["response_tokens"]


def read_prompts(path: Path) -> list[tuple[list[dict[str, str]], int, int]]:
    if not path.is_file():
        raise PermanentError(f"{path}: the pack artifact has no prompts.jsonl")
    records = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                records.append(_record(path, lineno, line))
    if not records:
        raise PermanentError(f"{path}: no prompt records")
    return records


def build_workload(path: Path, num_prompts: int, max_tokens: int, max_model_len: int,
                   seed: int = WORKLOAD_SEED) -> list[BenchRequest]:
    """``num_prompts`` requests sampled from ``path`` (without replacement when there are enough records)."""
    eligible = [
        BenchRequest(messages, prompt, min(max(response, 1), max_tokens, max_model_len - prompt))
        for messages, prompt, response in read_prompts(path)
        if prompt < max_model_len
    ]
    if not eligible:
        raise PermanentError(
            f"{path}: every prompt is at least benchmark.max_model_len={max_model_len} tokens long")
    rng = random.Random(seed)
    if len(eligible) >= num_prompts:
        return rng.sample(eligible, num_prompts)
    return [rng.choice(eligible) for _ in range(num_prompts)]


def describe(requests: list[BenchRequest]) -> dict[str, Any]:
    """Length statistics of the load, recorded beside the results."""
    prompts = [r.prompt_tokens for r in requests]
    outputs = [r.output_tokens for r in requests]
    return {
        "num_requests": len(requests),
        "seed": WORKLOAD_SEED,
        "prompt_tokens": {"mean": statistics.fmean(prompts), "min": min(prompts), "max": max(prompts)},
        "output_tokens": {"mean": statistics.fmean(outputs), "min": min(outputs), "max": max(outputs),
                          "total": sum(outputs)},
    }
