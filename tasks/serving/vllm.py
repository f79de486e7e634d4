"""The ``vllm serve`` command line every stage that serves a model uses, derived from the model and the machine.

Which vLLM runs (found, or the project's own environment, per platform) is tasks/serving/vllm_env.py's. Flags are the
ones vLLM defines in 0.33.0 and in the CPU build's 0.32.0 (tests/test_benchmark_vllm_cli.py says where each was
read); before a server starts, every flag we pass is also looked up in the help of the vLLM in use, so a release
without one fails in seconds, naming it, instead of at startup.
"""

from __future__ import annotations

import hashlib
import os
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from finetune.profile import BenchmarkConfig, Profile
from finetune.stage import PermanentError
from llama4tune.tool_calls import SERVE_FLAGS
from tasks.serving.vllm_env import BUILDS, VllmCli, cache_root

MIN_VERSION = BUILDS["cuda"].floor  # the GPU release deployments/locks/check.py pins
# vLLM's block size when none is given: its CPU platform's and CUDA's.
DEFAULT_BLOCK_SIZE = {"cpu": 128, "cuda": 16}
# The smallest CPU KV cache we ask for (measured to serve the tiny model at concurrency 8), and the share of the
# available memory it may take: the server's weights and the flow run need the rest.
KV_CACHE_FLOOR_BYTES = 64 * 2**20
KV_CACHE_MEMORY_SHARE = 0.25
HELP_TIMEOUT_S = 300.0


def serving_platform(profile: Profile) -> str:
    """'cpu' or 'cuda': where this profile's serving stages run (a CPU profile trains, and serves, on CPU)."""
    return "cpu" if profile.train.device == "cpu" else "cuda"


@dataclass(frozen=True)
class ModelShape:
    """What the serve arguments need from a checkpoint's config.json (a Llama 4 keeps it in text_config)."""

    max_position_embeddings: int
    attention_chunk_size: int | None
    kv_bytes_per_token_per_byte: int
    """2 (K and V) x layers x KV heads x head dim: the KV cache's bytes per token for a 1-byte dtype."""


def model_shape(model_dir: Path) -> ModelShape:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
        text = config.get("text_config") or config
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        kv_heads = text.get("num_key_value_heads") or text["num_attention_heads"]
        return ModelShape(max_position_embeddings=int(text["max_position_embeddings"]),
                          attention_chunk_size=text.get("attention_chunk_size"),
                          kv_bytes_per_token_per_byte=2 * int(text["num_hidden_layers"]) * kv_heads * head_dim)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PermanentError(f"{path}: cannot read the model's shape for vllm serve: {type(exc).__name__}: {exc}") \
            from None


def max_model_len(shape: ModelShape, cfg: BenchmarkConfig) -> int:
    """benchmark.max_model_len, within the positions the model has."""
    return min(cfg.max_model_len, shape.max_position_embeddings)


def block_size(shape: ModelShape, platform: str) -> int:
    """The platform's default block size, halved until it divides the model's attention chunk: vLLM's chunked local
    attention asserts ``attn_chunk_size % block_size == 0`` at the first request (CPU: 128 vs the tiny model's 64)."""
    size = DEFAULT_BLOCK_SIZE[platform]
    chunk = shape.attention_chunk_size
    while chunk and size > 1 and chunk % size:
        size //= 2
    return size


def kv_cache_bytes(shape: ModelShape, max_len: int, max_seqs: int, dtype_bytes: int) -> int:
    """CPU KV cache: room for max_seqs full-length sequences, at least the floor, at most a share of free memory."""
    per_sequence = shape.kv_bytes_per_token_per_byte * dtype_bytes * max_len
    budget = int(psutil.virtual_memory().available * KV_CACHE_MEMORY_SHARE)
    if per_sequence > budget:
        raise PermanentError(f"vllm serve on CPU: one {max_len}-token sequence needs {per_sequence / 2**20:.0f} MiB "
                             f"of KV cache, more than {KV_CACHE_MEMORY_SHARE:.0%} of the free memory "
                             f"({budget / 2**20:.0f} MiB); lower benchmark.max_model_len")
    return min(max(per_sequence * max_seqs, KV_CACHE_FLOOR_BYTES), budget)


def serve_args(model_dir: Path, port: int, cfg: BenchmarkConfig, platform: str, *, max_seqs: int,
               evaluation: bool = False) -> list[str]:
    """Arguments after the vLLM CLI: serve the checkpoint directory on 127.0.0.1:port (served name = the path).

    - max_model_len is essential: Llama 4 configs declare up to 10M positions, whose KV cache vLLM would reserve.
    - dtype: the checkpoint's (bf16; compressed-tensors W4A16 kernels from its quantization_config), except that an
      evaluation on CPU runs fp32, what lm-eval's hf backend scores in there, so both backends score the same model.
    - evaluation turns prefix caching off: with it, prompt logprobs are not deterministic (vLLM PR #42245).
    - KV cache: on GPUs a share of GPU memory; on CPU a size in bytes (vLLM's CPU default is 4 GiB).
    - CPU servers run eagerly: compiling takes ~90 s more per start (131 s vs 43 s measured), which a tiny model's
      benchmark never wins back.
    - Tool calling is on, with the parser of the format pack trains calls in (llama4tune.tool_calls)."""
    shape = model_shape(model_dir)
    max_len = max_model_len(shape, cfg)
    dtype = "float32" if evaluation and platform == "cpu" else "auto"
    args = [
        "serve", str(model_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--tensor-parallel-size", str(cfg.tensor_parallel_size),
        "--max-model-len", str(max_len),
        "--block-size", str(block_size(shape, platform)),
        "--dtype", dtype,
        "--seed", "0",
        *SERVE_FLAGS,  # tool calls come back as OpenAI tool_calls, read in the format they were trained in
    ]
    if platform == "cpu":
        dtype_bytes = 4 if dtype == "float32" else 2
        args += ["--kv-cache-memory-bytes", str(kv_cache_bytes(shape, max_len, max_seqs, dtype_bytes)),
                 "--enforce-eager"]
    else:
        args += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    if evaluation:
        args.append("--no-enable-prefix-caching")
    return args


def help_text(cli: VllmCli, subcommand: list[str]) -> str:
    """``vllm <subcommand> --help=all`` of the vLLM in use, cached per CLI and version (it takes ~30 s to import)."""
    name = hashlib.sha256(json.dumps([cli.command, cli.version, subcommand]).encode()).hexdigest()[:16]
    path = cache_root() / "help" / f"{name}.txt"
    if path.is_file():
        return path.read_text()
    done = subprocess.run([*cli.command, *subcommand, "--help=all"], capture_output=True, text=True,
                          timeout=HELP_TIMEOUT_S, check=False)
    if done.returncode != 0 or "usage:" not in done.stdout:
        raise PermanentError(f"{' '.join([*cli.command, *subcommand])} --help=all failed (exit code "
                             f"{done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(done.stdout)
    tmp.replace(path)
    return done.stdout


def unknown_flags(args: list[str], help_output: str) -> list[str]:
    defined = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", help_output))
    return [arg for arg in args if arg.startswith("--") and arg.split("=", 1)[0] not in defined]


def check_flags(cli: VllmCli, subcommand: list[str], args: list[str]) -> None:
    """Every flag in args is one the vLLM in use defines for subcommand; a permanent error naming the others."""
    missing = unknown_flags(args, help_text(cli, subcommand))
    if missing:
        raise PermanentError(f"vLLM {cli.version} ({cli.where}) has no {', '.join(missing)} for "
                             f"`vllm {' '.join(subcommand)}`: this project's flags were read from vLLM "
                             f"{BUILDS['cpu'].floor} (CPU build) and {MIN_VERSION}")


def length_body(output_tokens: int) -> dict[str, Any]:
    """Request fields that make vLLM generate exactly ``output_tokens`` (vLLM's ``ignore_eos`` extension)."""
    return {"max_tokens": output_tokens, "ignore_eos": True}
