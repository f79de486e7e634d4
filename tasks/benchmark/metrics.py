"""Per-request measurements and their summary for one concurrency level.

Definitions follow ``vllm bench serve`` (vllm/benchmarks/serve.py, ``calculate_metrics``) so both load generators
report the same quantities under the same names:
- TTFT: request sent -> first chunk carrying generated output;
- ITL: gaps between successive output chunks (a chunk may hold several tokens);
- TPOT: (latency - TTFT) / (output tokens - 1), per request with more than one output token;
- E2EL: request sent -> last output chunk.
Throughputs divide by the wall time of the whole level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass
class RequestOutcome:
    success: bool = False
    error: str = ""
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    values = np.asarray(values_s or [0.0]) * 1000.0
    out = {f"mean_{name}_ms": float(values.mean()), f"median_{name}_ms": float(np.median(values))}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(values, p))
    return out


def summarize(outcomes: list[RequestOutcome], duration_s: float, concurrency: int) -> dict[str, Any]:
    """One level's result, keyed like vllm bench serve's result JSON (plus error_rate and sample errors)."""
    ok = [o for o in outcomes if o.success]
    failed = len(outcomes) - len(ok)
    total_in = sum(o.prompt_tokens for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    tpots = [(o.latency - o.ttft) / (o.output_tokens - 1) for o in ok if o.output_tokens > 1]
    summary: dict[str, Any] = {
        "max_concurrency": concurrency,
        "num_prompts": len(outcomes),
        "completed": len(ok),
        "failed": failed,
        "error_rate": failed / len(outcomes) if outcomes else 0.0,
        "duration": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    summary |= _stats("ttft", [o.ttft for o in ok])
    summary |= _stats("tpot", tpots)
    summary |= _stats("itl", [gap for o in ok for gap in o.itl])
    summary |= _stats("e2el", [o.latency for o in ok])
    summary["errors"] = sorted({o.error for o in outcomes if not o.success})[:5]
    return summary
