"""The benchmark's UI tables and latency-vs-throughput plots: one model's (the stage), bf16 against 4-bit (the run)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from finetune.store import Artifact, atomic_file

REFERENCE_MODEL = "bf16"
# What a relative-throughput cell says when the two models were served by different engines (vLLM and its stand-in):
# their ratio would measure the engines, not the weights.
DIFFERENT_ENGINES = "different engines"
RESULTS_FILE = "results.json"
PLOT_FILE = "latency_vs_throughput.png"


def _ms(value: float) -> float:
    return round(value, 2)


def engine_label(results: dict[str, Any]) -> str:
    """The engine and its version, as every figure names them (from results.json or the stage's metrics)."""
    return f"{results.get('engine', '')} {results.get('engine_version', '')}".strip()


def relative(value: float, reference: float, same_engine: bool) -> float | str:
    return round(value / reference, 3) if same_engine else DIFFERENT_ENGINES


def comparison_rows(models: dict[str, list[dict[str, Any]]], engines: dict[str, str]) -> list[dict[str, Any]]:
    """One row per model and concurrency, naming its engine; non-reference models also get their throughput relative
    to bf16, when the same engine served both."""
    reference = {level["max_concurrency"]: level for level in models.get(REFERENCE_MODEL, [])}
    rows = []
    for name, levels in models.items():
        for level in levels:
            c = level["max_concurrency"]
            row: dict[str, Any] = {
                "model": name,
                "engine": engines.get(name, ""),
                "concurrency": c,
                "requests/s": round(level["request_throughput"], 3),
                "output tok/s": round(level["output_throughput"], 2),
                "TTFT mean ms": _ms(level["mean_ttft_ms"]),
                "TTFT p50 ms": _ms(level["median_ttft_ms"]),
                "TTFT p99 ms": _ms(level["p99_ttft_ms"]),
                "TPOT mean ms": _ms(level["mean_tpot_ms"]),
                "TPOT p50 ms": _ms(level["median_tpot_ms"]),
                "TPOT p99 ms": _ms(level["p99_tpot_ms"]),
                "ITL mean ms": _ms(level["mean_itl_ms"]),
                "ITL p50 ms": _ms(level["median_itl_ms"]),
                "ITL p99 ms": _ms(level["p99_itl_ms"]),
                "errors": f"{level['failed']}/{level['num_prompts']}",
            }
            ref = reference.get(c)
            if name != REFERENCE_MODEL and ref and ref["output_throughput"] > 0:
                row[f"tok/s vs {REFERENCE_MODEL}"] = relative(level["output_throughput"], ref["output_throughput"],
                                                             engines.get(name) == engines.get(REFERENCE_MODEL))
            rows.append(row)
    return rows


def levels_of(benchmarks: Iterable[Artifact]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """Model name -> its concurrency levels, the reference model first, and model name -> the engine that served it,
    from the results of benchmark steps (their results.json readable here)."""
    models: dict[str, list[dict[str, Any]]] = {}
    engines: dict[str, str] = {}
    for artifact in benchmarks:
        results = json.loads((Path(artifact.path) / RESULTS_FILE).read_text())
        models |= {name: model["levels"] for name, model in results["models"].items()}
        engines |= {name: engine_label(results) for name in results["models"]}
    return dict(sorted(models.items(), key=lambda item: item[0] != REFERENCE_MODEL)), engines


def plot_latency_vs_throughput(models: dict[str, list[dict[str, Any]]], engines: dict[str, str], path: Path,
                               title: str) -> None:
    with atomic_file(path, "wb") as handle:
        handle.write(latency_vs_throughput_png(models, engines, title))


def latency_vs_throughput_png(models: dict[str, list[dict[str, Any]]], engines: dict[str, str], title: str) -> bytes:
    """Median TTFT and TPOT against output token throughput, one line per model (named with its engine), points
    labelled by concurrency."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric, label in ((axes[0], "median_ttft_ms", "TTFT p50 (ms)"),
                              (axes[1], "median_tpot_ms", "TPOT p50 (ms)")):
        for name, levels in models.items():
            xs = [level["output_throughput"] for level in levels]
            ys = [level[metric] for level in levels]
            ax.plot(xs, ys, marker="o", label=f"{name} ({engines[name]})" if name in engines else name)
            for level, x, y in zip(levels, xs, ys):
                ax.annotate(f"c={level['max_concurrency']}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
