"""The inference servers the benchmark and evaluate can start: vLLM, and ``transformers serve`` as the stand-in where
vLLM cannot load a model (a W4A16 MoE on a CPU without AMX), and which engine serves each weight format.

Both speak the OpenAI HTTP protocol (streaming chat completions with a usage block, legacy completions,
``GET /health``), so one load generator measures either and lm-eval's ``local-completions`` scores either. ``transformers serve`` is a real server, but it is not vLLM: its notes below go into
results.json so nobody mistakes its numbers for vLLM's.
"""

from __future__ import annotations

import json
import os
import sys
from functools import cache
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from finetune.profile import BenchmarkConfig, Profile
from tasks.serving import vllm, vllm_env

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
class ServeRequest:
    """One server to start: the checkpoint, where, and what for (a benchmark, or lm-eval's scoring)."""

    model_dir: Path
    port: int
    cfg: BenchmarkConfig
    platform: str
    max_seqs: int
    """Requests the client keeps in flight (sizes the CPU KV cache)."""
    evaluation: bool = False


@dataclass(frozen=True)
class Engine:
    name: str
    label: str
    """What results.json names as the engine."""
    version: Callable[[str], str]
    """The version that serves on a platform ('cpu' or 'cuda')."""
    notes: tuple[str, ...]
    serve_command: Callable[[ServeRequest], list[str]]
    length_body: Callable[[int], dict[str, Any]]
    """Request fields that make the server generate exactly n tokens."""
    health_path: str = "/health"

    def env(self) -> dict[str, str]:
        return {**os.environ, **_QUIET_ENV}


def _transformers_serve_command(request: ServeRequest) -> list[str]:
    # `transformers serve MODEL` preloads MODEL before it listens, so /health answers only once it can generate.
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", str(request.model_dir),
            "--host", "127.0.0.1", "--port", str(request.port), "--device", "auto", "--dtype", "auto",
            "--default-seed", "0"]


def _transformers_length_body(output_tokens: int) -> dict[str, Any]:
    # transformers serve rejects vLLM's `ignore_eos` (unknown request field, HTTP 422) but accepts a JSON
    # generation_config: min_new_tokens = max_new_tokens makes it generate exactly n tokens.
    config = {"max_new_tokens": output_tokens, "min_new_tokens": output_tokens, "do_sample": False}
    return {"max_tokens": output_tokens, "generation_config": json.dumps(config)}


def _vllm_serve_command(request: ServeRequest) -> list[str]:
    cli = vllm_env.resolve(request.platform)
    args = vllm.serve_args(request.model_dir, request.port, request.cfg, request.platform, max_seqs=request.max_seqs,
                           evaluation=request.evaluation)
    vllm.check_flags(cli, ["serve"], args[2:])
    return [*cli.command, *args]


VLLM = Engine(
    name="vllm",
    label="vllm",
    version=lambda platform: vllm_env.resolve(platform).version,
    notes=(),
    serve_command=_vllm_serve_command,
    length_body=vllm.length_body,
)

TRANSFORMERS_SERVE = Engine(
    name="transformers-serve",
    label="transformers-serve (CPU stand-in for vLLM)",
    version=lambda platform: metadata.version("transformers"),
    notes=(
        "transformers serve is a real OpenAI-compatible server, the stand-in where vLLM cannot load the model; "
        "its numbers are not vLLM's.",
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
WEIGHTS = ("bf16", "w4a16")


@cache
def cpu_has_amx() -> bool:
    """Whether this CPU has AMX (Intel Sapphire Rapids and later), which vLLM's CPU int4 MoE kernel needs."""
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def engine_for(profile: Profile, weights: str) -> tuple[str, str | None]:
    """Which engine serves ``weights`` ('bf16' or 'w4a16') for this profile on this machine, decided before any server
    starts, and why it is not benchmark.engine (None when it is).

    vLLM's CPU build loads a W4A16 mixture of experts (every Llama 4) only with AMX; elsewhere it fails at load with
    "No WNA16 MoE backend supports the deployment configuration" (measured: notes/vllm-cpu.md), so that model is
    served by the stand-in instead."""
    if profile.benchmark.engine == "vllm" and weights == "w4a16" and vllm.serving_platform(profile) == "cpu" \
            and not cpu_has_amx():
        return TRANSFORMERS_SERVE.name, ("vLLM's CPU build cannot load a W4A16 mixture of experts on this CPU: its "
                                         "int4 MoE kernel needs AMX (no amx_int8 in /proc/cpuinfo)")
    return profile.benchmark.engine, None


def serving_key(profile: Profile) -> dict[str, object]:
    """What decides the engines on this machine, for the keys of the stages that serve: a store shared by different
    machines must never hand one of them another engine's figures."""
    platform = vllm.serving_platform(profile)
    engines = {weights: engine_for(profile, weights)[0] for weights in WEIGHTS}
    out: dict[str, object] = {"platform": platform, "engines": engines}
    if VLLM.name in engines.values():
        build = vllm_env.BUILDS[platform]
        out["vllm"] = f"{build.distribution}=={build.pin()}"
    return out
