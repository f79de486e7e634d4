"""The inference servers the benchmark (and evaluate, on GPUs) can start: vLLM, and ``transformers serve`` as vLLM's
CPU stand-in.

Both speak the OpenAI HTTP protocol (streaming chat completions with a usage block, legacy completions,
``GET /health``), so one load generator measures either and lm-eval's ``local-completions`` scores either. ``transformers serve`` is a real server, but it is not vLLM: its notes below go into
results.json so nobody mistakes its numbers for vLLM's.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune.profile import BenchmarkConfig
from tasks.serving import vllm

# Local checkpoints only: no hub lookups, no update checks, no usage reporting from inside a benchmark.
_QUIET_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


@dataclass(frozen=True)
class Engine:
    name: str
    label: str
    """What results.json names as the engine."""
    version: Callable[[], str]
    notes: tuple[str, ...]
    serve_command: Callable[[Path, int, BenchmarkConfig], list[str]]
    length_body: Callable[[int], dict[str, Any]]
    """Request fields that make the server generate exactly n tokens."""
    health_path: str = "/health"

    def env(self) -> dict[str, str]:
        return {**os.environ, **_QUIET_ENV}


def _transformers_serve_command(model_dir: Path, port: int, cfg: BenchmarkConfig) -> list[str]:
    # `transformers serve MODEL` preloads MODEL before it listens, so /health answers only once it can generate.
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--device", "auto", "--dtype", "auto",
            "--default-seed", "0"]


def _transformers_length_body(output_tokens: int) -> dict[str, Any]:
    # transformers serve rejects vLLM's `ignore_eos` (unknown request field, HTTP 422) but accepts a JSON
    # generation_config: min_new_tokens = max_new_tokens makes it generate exactly n tokens.
    config = {"max_new_tokens": output_tokens, "min_new_tokens": output_tokens, "do_sample": False}
    return {"max_tokens": output_tokens, "generation_config": json.dumps(config)}


def _vllm_serve_command(model_dir: Path, port: int, cfg: BenchmarkConfig) -> list[str]:
    return [*vllm.vllm_command(), *vllm.serve_args(model_dir, port, cfg)]


VLLM = Engine(
    name="vllm",
    label="vllm",
    version=vllm.vllm_version,
    notes=(),
    serve_command=_vllm_serve_command,
    length_body=vllm.length_body,
)

TRANSFORMERS_SERVE = Engine(
    name="transformers-serve",
    label="transformers-serve (CPU stand-in for vLLM)",
    version=lambda: metadata.version("transformers"),
    notes=(
        "transformers serve is a real OpenAI-compatible server used to test the benchmark's client and server "
        "lifecycle where vLLM cannot run (no GPU); its numbers are not vLLM's.",
        "It generates one request at a time (its continuous batching does not support Llama 4's chunked "
        "attention), so throughput does not grow with concurrency; queueing shows up as TTFT.",
        "The W4A16 checkpoint is loaded through transformers' compressed-tensors integration, which "
        "decompresses the packed int4 weights to dense tensors on the first forward pass: outputs carry the "
        "4-bit rounding, but no int4 kernel runs, so its speed and memory say nothing about vLLM's W4A16 kernels.",
        "tensor_parallel_size, max_model_len and gpu_memory_utilization are vLLM settings and do not apply; "
        "max_model_len still caps prompt + output length in the load.",
    ),
    serve_command=_transformers_serve_command,
    length_body=_transformers_length_body,
)

ENGINES = {engine.name: engine for engine in (VLLM, TRANSFORMERS_SERVE)}
