"""Finding the vLLM CLI and the ``vllm serve`` command line every stage that serves a model uses.

vLLM pins its own torch, compressed-tensors and fastapi, which conflict with this project's (measured with pip's
resolver; see deployments/locks/README.md), so vLLM never lives in the flow run's environment: it is a separate
environment (the serve image's /opt/vllm) whose ``vllm`` we only ever run as a subprocess.

Flags are the ones vLLM 0.33.0 defines (tests/test_benchmark_vllm_cli.py says where each was read). An older vLLM is
refused before anything loads: we have not read its flags, and its custom benchmark dataset lacks per-record lengths.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from finetune.profile import BenchmarkConfig
from finetune.stage import PermanentError
from finetune.tool_calls import SERVE_FLAGS

MIN_VERSION = Version("0.33.0")
VERSION_TIMEOUT_S = 300.0  # `vllm --version` imports torch and vllm: tens of seconds on a cold disk


def _beside_interpreter() -> Path:
    return Path(sys.executable).parent / "vllm"


def vllm_executable() -> list[str] | None:
    """How to run the vLLM CLI: this environment's ``vllm`` script, else one on PATH, else the importable module."""
    beside = _beside_interpreter()
    if beside.is_file():
        return [str(beside)]
    if found := shutil.which("vllm"):
        return [found]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    return None


def _where_we_looked() -> str:
    return (f"{_beside_interpreter()} (beside this interpreter), `vllm` on PATH ({os.environ.get('PATH', '')}), "
            f"and the vllm module importable by {sys.executable}")


def vllm_command() -> list[str]:
    command = vllm_executable()
    if command is None:
        raise PermanentError(f"this profile serves models with vLLM (benchmark.engine or evaluate.backend 'vllm') "
                             f"but no vLLM CLI is found; looked for {_where_we_looked()}. Run the stage in the serve "
                             "image (Dockerfile target 'serve', deploy.images.serve), put a vLLM environment's "
                             "`vllm` on PATH, or use the CPU stand-ins (engine 'transformers-serve', backend 'hf')")
    return command


def vllm_version(command: list[str] | None = None) -> str:
    command = command or vllm_executable()
    if command is None:
        return "not installed"
    done = subprocess.run([*command, "--version"], capture_output=True, text=True,
                          timeout=VERSION_TIMEOUT_S, check=False)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else "unknown"


def require_vllm() -> str:
    """The version of the vLLM CLI this machine runs, checked to be at least MIN_VERSION; a permanent error naming
    what was found where."""
    command = vllm_command()
    found = vllm_version(command)
    try:
        ok = Version(found) >= MIN_VERSION
    except InvalidVersion:
        ok = False
    if not ok:
        raise PermanentError(f"{' '.join(command)} --version says {found!r}; this project's vLLM flags need vLLM >= "
                             f"{MIN_VERSION} (looked for {_where_we_looked()}): install vllm=={MIN_VERSION} in the "
                             "serve image's vLLM environment (deployments/locks/vllm.txt)")
    return found


def serve_args(model_dir: Path, port: int, cfg: BenchmarkConfig) -> list[str]:
    """Arguments after ``vllm``: serve the checkpoint directory on 127.0.0.1:port (served name = the path).

    max_model_len is essential: Llama 4 configs declare up to 10M positions, whose KV cache vLLM would try to reserve;
    dtype 'auto' (vLLM's default) keeps bf16 weights bf16 and picks compressed-tensors W4A16 kernels from the
    checkpoint's quantization_config. Tool calling is on, with the parser of the format pack trains calls in
    (finetune.tool_calls)."""
    return [
        "serve", str(model_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--tensor-parallel-size", str(cfg.tensor_parallel_size),
        "--max-model-len", str(cfg.max_model_len),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
        "--seed", "0",
        *SERVE_FLAGS,  # tool calls come back as OpenAI tool_calls, read in the format they were trained in
    ]


def length_body(output_tokens: int) -> dict[str, Any]:
    """Request fields that make vLLM generate exactly ``output_tokens`` (vLLM's ``ignore_eos`` extension)."""
    return {"max_tokens": output_tokens, "ignore_eos": True}
