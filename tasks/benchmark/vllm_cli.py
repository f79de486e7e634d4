"""Command lines for ``vllm serve`` and ``vllm bench serve``, and reading the benchmark's result JSON.

Flags are the ones vLLM 0.33.0 defines (see tests/test_benchmark_vllm_cli.py for where each was read). ``vllm bench
serve`` reads our load from a ``custom`` dataset: one JSON line per request with ``prompt`` (the user message; the
server applies the chat template, so ``--skip-chat-template``) and ``output_tokens`` (used with
``--custom-output-len -1``), in our order (``--disable-shuffle``), with EOS ignored so every request generates
exactly its length, as our own load generator asks the server to.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from finetune.profile import BenchmarkConfig
from finetune.stage import PermanentError
from finetune.store import atomic_file
from tasks.benchmark.metrics import LATENCY_METRICS, PERCENTILES
from tasks.benchmark.workload import BenchRequest

CHAT_ENDPOINT = "/v1/chat/completions"


def vllm_executable() -> list[str] | None:
    """How to run the vLLM CLI: this environment's ``vllm`` script, else one on PATH, else the importable module.

    vLLM pins its own torch and compressed-tensors, so it often lives in an environment of its own (a separate venv
    or image); putting that environment's ``vllm`` on PATH is enough, since we only ever run it as a subprocess.
    """
    beside = Path(sys.executable).parent / "vllm"
    if beside.is_file():
        return [str(beside)]
    if found := shutil.which("vllm"):
        return [found]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    return None


def vllm_command() -> list[str]:
    command = vllm_executable()
    if command is None:
        raise PermanentError("benchmark.engine is 'vllm' but no vllm CLI is found (not in this environment, not on "
                             "PATH): install vllm in the GPU image, or use engine 'transformers-serve' (the CPU "
                             "stand-in)")
    return command


def vllm_version() -> str:
    command = vllm_executable()
    if command is None:
        return "not installed"
    done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=300)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "unknown"


def serve_args(model_dir: Path, port: int, cfg: BenchmarkConfig) -> list[str]:
    """Arguments after ``vllm``: serve the checkpoint directory on 127.0.0.1:port (served name = the path)."""
    return [
        "serve", str(model_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--tensor-parallel-size", str(cfg.tensor_parallel_size),
        "--max-model-len", str(cfg.max_model_len),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
        "--seed", "0",
    ]


def length_body(output_tokens: int) -> dict[str, Any]:
    """Request fields that make vLLM generate exactly ``output_tokens`` (vLLM's ``ignore_eos`` extension)."""
    return {"max_tokens": output_tokens, "ignore_eos": True}


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
