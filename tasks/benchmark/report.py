"""The benchmark's UI table and its latency-vs-throughput plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.store import atomic_file

REFERENCE_MODEL = "bf16"


def _ms(value: float) -> float:
    return round(value, 2)


def comparison_rows(models: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per model and concurrency; non-reference models also get their throughput relative to bf16."""
    reference = {level["max_concurrency"]: level for level in models.get(REFERENCE_MODEL, [])}
    rows = []
    for name, levels in models.items():
        for level in levels:
            c = level["max_concurrency"]
            row: dict[str, Any] = {
                "model": name,
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
                row[f"tok/s vs {REFERENCE_MODEL}"] = round(level["output_throughput"] / ref["output_throughput"], 3)
            rows.append(row)
    return rows


def plot_latency_vs_throughput(models: dict[str, list[dict[str, Any]]], path: Path, title: str) -> None:
    """Median TTFT and TPOT against output token throughput, one line per model, points labelled by concurrency."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric, label in ((axes[0], "median_ttft_ms", "TTFT p50 (ms)"),
                              (axes[1], "median_tpot_ms", "TPOT p50 (ms)")):
        for name, levels in models.items():
            xs = [level["output_throughput"] for level in levels]
            ys = [level[metric] for level in levels]
            ax.plot(xs, ys, marker="o", label=name)
            for level, x, y in zip(levels, xs, ys):
                ax.annotate(f"c={level['max_concurrency']}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
