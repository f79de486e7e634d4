"""benchmark stage: vLLM serving benchmark of one model (transformers serve where vLLM cannot load it).

The pipeline runs it twice (flows/pipeline.py): ``benchmark-bf16`` on the converted model, as soon as the quality gate
has passed, and ``benchmark-w4a16`` on the quantized one, so the bf16 numbers never wait for quantization. Upstream:
``model`` (a bf16 HF checkpoint from convert, or a compressed-tensors W4A16 one from quantize) and ``pack``
(``prompts.jsonl``, the prompt/length distribution). Writes ``results.json``, ``latency_vs_throughput.png``, the
server log under ``logs/`` and the ``levels`` table; the bf16-vs-4-bit comparison reads both artifacts
(tasks/benchmark/report.py, the run report). The work is in runner.py, imported on first run.
"""

from __future__ import annotations

from typing import Any

from finetune.profile import Profile
from finetune.stage import StageSpec, deferred
from tasks.serving.engines import serving_key


def stage_config(profile: Profile) -> dict[str, Any]:
    # Which checkpoint is served is the input artifact's (convert or quantize), already in the key; `weights` only
    # chooses which benchmark steps the pipeline has. Which engine serves each weight format on this machine is.
    return {**profile.benchmark.model_dump(mode="json", exclude={"weights"}), "serving": serving_key(profile)}


run = deferred("tasks.benchmark.runner")

SPEC = StageSpec(
    name="benchmark",
    version="2",
    run=run,
    config=stage_config,
    upstream=("model", "pack"),
)

__all__ = ["SPEC", "run", "stage_config"]
