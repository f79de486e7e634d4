"""Our own OpenAI-protocol load generator: streaming ``/v1/chat/completions`` over httpx at a fixed concurrency.

Used when ``vllm bench serve`` is not available (the CPU stand-in) or cannot express the load (multi-message prompts).
All requests of a level are issued at once and a semaphore keeps ``concurrency`` of them in flight, as
``vllm bench serve --request-rate inf --max-concurrency N`` does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx

from tasks.benchmark.metrics import RequestOutcome, summarize
from tasks.benchmark.workload import BenchRequest

CHAT_PATH = "/v1/chat/completions"
T = TypeVar("T")


def chat_payload(model: str, request: BenchRequest, length_body: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model,
        "messages": request.messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,  # greedy: both models see the same decoding rule
        **length_body,
    }


def _has_output(chunk: dict[str, Any]) -> tuple[bool, str]:
    """Whether a chunk carries generated output (text, reasoning, or the final finish_reason) and its text."""
    choices = chunk.get("choices") or []
    if not choices:
        return False, ""
    choice = choices[0]
    delta = choice.get("delta") or {}
    text = delta.get("content") or delta.get("reasoning_content") or choice.get("text") or ""
    return bool(text) or choice.get("finish_reason") is not None, text


async def stream_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> RequestOutcome:
    outcome = RequestOutcome()
    start = time.perf_counter()
    last = start
    chunks_with_text = 0
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")[:300]
                outcome.error = f"HTTP {response.status_code}: {body}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments (keep-alive pings)
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    outcome.error = f"server error in stream: {chunk['error']}"
                    return outcome
                produced, text = _has_output(chunk)
                if produced:
                    now = time.perf_counter()
                    if outcome.ttft == 0.0:
                        outcome.ttft = now - start
                    else:
                        outcome.itl.append(now - last)
                    last = now
                    chunks_with_text += bool(text)
                if usage := chunk.get("usage"):
                    outcome.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    outcome.output_tokens = int(usage.get("completion_tokens") or 0)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome
    if outcome.ttft == 0.0:
        outcome.error = "stream ended without any generated output"
        return outcome
    outcome.latency = last - start
    # A server that sends no usage block: count output chunks (a lower bound on tokens).
    outcome.output_tokens = outcome.output_tokens or chunks_with_text
    outcome.success = True
    return outcome


async def drive(base_url: str, model: str, requests: list[BenchRequest], concurrency: int,
                length_body: Callable[[int], dict[str, Any]],
                timeout_s: float = 600.0) -> tuple[list[RequestOutcome], float]:
    """Send every request with at most ``concurrency`` in flight. Returns outcomes (in request order) and wall time."""
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    url = base_url.rstrip("/") + CHAT_PATH
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        async def limited(request: BenchRequest) -> RequestOutcome:
            payload = chat_payload(model, request, length_body(request.output_tokens))
            async with semaphore:
                return await stream_request(client, url, payload)

        start = time.perf_counter()
        outcomes = await asyncio.gather(*(limited(r) for r in requests))
        return list(outcomes), time.perf_counter() - start


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine from sync code, also when the caller's thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())  # type: ignore[arg-type]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, make()).result()  # type: ignore[arg-type]


def run_level(base_url: str, model: str, requests: list[BenchRequest], concurrency: int,
              length_body: Callable[[int], dict[str, Any]], timeout_s: float = 600.0) -> dict[str, Any]:
    """One concurrency level, summarized (see tasks.benchmark.metrics)."""
    outcomes, duration = run_sync(lambda: drive(base_url, model, requests, concurrency, length_body, timeout_s))
    return summarize(outcomes, duration, concurrency)
