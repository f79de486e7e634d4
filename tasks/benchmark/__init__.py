"""benchmark stage: vLLM serving benchmark of the bf16 and the W4A16 model (CPU stand-in: transformers serve).

Upstream: ``convert`` (bf16 HF checkpoint), ``quantize`` (compressed-tensors W4A16 checkpoint), ``pack``
(``prompts.jsonl``, the prompt/length distribution). Writes ``results.json``, ``latency_vs_throughput.png``,
server logs under ``logs/``, and the ``comparison`` table.
"""

from __future__ import annotations

from finetune.stage import StageSpec
from tasks.benchmark.runner import run, stage_config

SPEC = StageSpec(
    name="benchmark",
    version="1",
    run=run,
    config=stage_config,
    upstream=("convert", "quantize", "pack"),
)

__all__ = ["SPEC", "run"]
