"""Command lines for ``vllm bench serve`` and reading its result JSON (``vllm serve`` itself: tasks/serving/vllm.py).

Flags are the ones vLLM 0.33.0 defines (see tests/test_benchmark_vllm_cli.py for where each was read). ``vllm bench
serve`` reads our load from a ``custom`` dataset: one JSON line per request with ``prompt`` (the user message; the
server applies the chat template, so ``--skip-chat-template``) and ``output_tokens`` (used with
``--custom-output-len -1``), in our order (``--disable-shuffle``), with EOS ignored so every request generates
exactly its length, as our own load generator asks the server to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.store import atomic_file
from tasks.benchmark.metrics import LATENCY_METRICS, PERCENTILES
from tasks.benchmark.workload import BenchRequest

CHAT_ENDPOINT = "/v1/chat/completions"


def can_express(requests: list[BenchRequest]) -> bool:
    """The custom dataset holds one user message per request; other prompts need our own load generator."""
    return all(r.single_user_turn for r in requests)


def write_custom_dataset(requests: list[BenchRequest], path: Path) -> None:
    with atomic_file(path, "w") as handle:
        for r in requests:
            handle.write(json.dumps({"prompt": r.messages[0]["content"], "output_tokens": r.output_tokens}) + "\n")


def bench_args(base_url: str, model: str, dataset: Path, num_prompts: int, concurrency: int,
               result_dir: Path, result_filename: str) -> list[str]:
    """Arguments after ``vllm``: one concurrency level over the custom dataset, result saved as JSON."""
    return [
        "bench", "serve",
        "--backend", "openai-chat",
        "--base-url", base_url,
        "--endpoint", CHAT_ENDPOINT,
        "--model", model,
        "--dataset-name", "custom",
        "--dataset-path", str(dataset),
        "--custom-output-len", "-1",
        "--skip-chat-template",
        "--disable-shuffle",
        "--no-oversample",
        "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency),
        "--request-rate", "inf",
        "--ignore-eos",
        "--temperature", "0",
        "--seed", "0",
        "--percentile-metrics", ",".join(LATENCY_METRICS),
        "--metric-percentiles", ",".join(str(p) for p in PERCENTILES),
        "--disable-tqdm",
        "--save-result",
        "--save-detailed",  # keeps per-request errors, so a failed level can say why
        "--result-dir", str(result_dir),
        "--result-filename", result_filename,
    ]


# Fields of vllm bench serve's result JSON that we keep (names shared with tasks.benchmark.metrics.summarize).
_RESULT_FIELDS = (
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput",
    *(f"{kind}_{metric}_ms" for metric in LATENCY_METRICS for kind in ("mean", "median")),
    *(f"p{p}_{metric}_ms" for metric in LATENCY_METRICS for p in PERCENTILES),
)


def parse_result(path: Path, concurrency: int) -> dict[str, Any]:
    """A level summary from vllm bench serve's saved result (``--save-result``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"vllm bench serve left no readable result at {path}: {exc}") from None
    missing = [name for name in _RESULT_FIELDS if name not in data]
    if missing:
        raise RuntimeError(f"{path}: vllm bench serve result lacks {missing}")
    summary: dict[str, Any] = {"max_concurrency": concurrency}
    summary |= {name: data[name] for name in _RESULT_FIELDS}
    total = data["completed"] + data["failed"]
    summary["num_prompts"] = total
    summary["error_rate"] = data["failed"] / total if total else 0.0
    summary["errors"] = sorted({e for e in data.get("errors") or [] if e})[:5]
    return summary
