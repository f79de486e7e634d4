"""benchmark stage: vLLM serving benchmark of the bf16 and the W4A16 model (CPU stand-in: transformers serve).

Upstream: ``convert`` (bf16 HF checkpoint), ``quantize`` (compressed-tensors W4A16 checkpoint), ``pack``
(``prompts.jsonl``, the prompt/length distribution). Writes ``results.json``, ``latency_vs_throughput.png``,
server logs under ``logs/``, and the ``comparison`` table. The work is in runner.py, imported on first run.
"""

from __future__ import annotations

from typing import Any

from finetune.profile import Profile
from finetune.stage import StageSpec, deferred


def stage_config(profile: Profile) -> dict[str, Any]:
    return profile.benchmark.model_dump(mode="json")


run = deferred("tasks.benchmark.runner")

SPEC = StageSpec(
    name="benchmark",
    version="1",
    run=run,
    config=stage_config,
    upstream=("convert", "quantize", "pack"),
)

__all__ = ["SPEC", "run", "stage_config"]
