"""Scores out of evaluate artifacts; base-vs-tuned deltas, the quality gate, 4-bit recovery, and their tables.

Values are in points: lm-eval's fractions times 100 (acc 0.612 -> 61.2), stderr likewise. A "drop" respects each
metric's direction (lm-eval's higher_is_better), so a perplexity rising is a drop too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.profile import GateConfig
from finetune.stage import PermanentError
from finetune.store import Artifact

RESULTS_FILE = "results.json"
_NOT_METRICS = {"alias", "name", "sample_len", "samples"}


class GateFailed(PermanentError):
    """The tuned model missed the profile's quality gate; the pipeline stops before quantization."""

    PREFIX = "quality gate failed: "

    def __init__(self, failures: list[str] | str):
        if isinstance(failures, str):  # rebuilt from its message (Prefect's JSON serializer keeps only that)
            failures = failures.removeprefix(self.PREFIX).split("; ")
        self.failures = failures
        super().__init__(self.PREFIX + "; ".join(failures))


@dataclass(frozen=True)
class Score:
    task: str
    metric: str  # lm-eval metric name, with ",<filter>" when the filter is not "none" (gsm8k's strict-match)
    value: float
    stderr: float | None
    higher_is_better: bool
    samples: int


@dataclass(frozen=True)
class Delta:
    task: str
    metric: str
    base: float
    tuned: float
    delta: float  # tuned - base, points
    stderr: float | None  # of the difference, treating the two runs as independent
    higher_is_better: bool

    @property
    def drop(self) -> float:
        return -self.delta if self.higher_is_better else self.delta


@dataclass(frozen=True)
class Recovery:
    task: str
    metric: str
    bf16: float
    w4: float
    recovery_pct: float | None  # share of the bf16 score the 4-bit model keeps; None when bf16 scored 0


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _leaf_samples(results: dict[str, Any], name: str) -> int:
    if name in results.get("n-samples", {}):
        return int(results["n-samples"][name]["effective"])
    return sum(_leaf_samples(results, child) for child in results.get("group_subtasks", {}).get(name, []))


def scores_from_results(results: dict[str, Any]) -> list[Score]:
    """One Score per metric of each reported task (the profile's tasks and groups, not every mmlu subtask)."""
    out: list[Score] = []
    for task in results["finetune"]["reported_tasks"]:
        entry = results["results"][task]
        directions = results.get("higher_is_better", {}).get(task, {})
        for key, raw in entry.items():
            if key in _NOT_METRICS or "_stderr," in key or "," not in key:
                continue
            value = _number(raw)
            if value is None:
                continue
            metric, filter_name = key.split(",", 1)
            stderr = _number(entry.get(f"{metric}_stderr,{filter_name}"))
            out.append(Score(
                task=task,
                metric=metric if filter_name == "none" else key,
                value=100 * value,
                stderr=None if stderr is None else 100 * stderr,
                higher_is_better=bool(directions.get(metric, True)),
                samples=_leaf_samples(results, task),
            ))
    return out


def scores(artifact: Artifact) -> list[Score]:
    path = Path(artifact.path) / RESULTS_FILE
    try:
        return scores_from_results(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError) as exc:
        raise PermanentError(f"{path}: not an evaluate results file ({type(exc).__name__}: {exc})") from exc


def _matched(reference: list[Score], other: list[Score]) -> Iterator[tuple[Score, Score]]:
    """(reference, other) score pairs of the same task and metric, in the other list's order."""
    by_key = {(s.task, s.metric): s for s in reference}
    for score in other:
        if (match := by_key.get((score.task, score.metric))) is not None:
            yield match, score


def compare_scores(base: list[Score], tuned: list[Score]) -> list[Delta]:
    rows = []
    for prior, after in _matched(base, tuned):
        stderr = (math.hypot(prior.stderr, after.stderr)
                  if prior.stderr is not None and after.stderr is not None else None)
        rows.append(Delta(after.task, after.metric, prior.value, after.value, after.value - prior.value, stderr,
                          after.higher_is_better))
    if not rows:
        raise PermanentError(
            f"base and tuned evaluations share no task metric (base: {sorted({s.task for s in base})}, "
            f"tuned: {sorted({s.task for s in tuned})})"
        )
    return rows


def compare(base: Artifact, tuned: Artifact) -> list[Delta]:
    """Per task and metric: base score, tuned score, delta in points, stderr of the delta."""
    return compare_scores(scores(base), scores(tuned))


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def _fmt_against(x: float, limit: float) -> str:
    """One decimal, unless that would print a failing value equal to its limit."""
    return f"{x:.2f}" if _fmt(x) == _fmt(limit) else _fmt(x)


def _pick(rows: list[Delta], task: str, metric: str | None) -> Delta:
    candidates = [r for r in rows if r.task == task]
    if not candidates:
        raise GateFailed([f"gate require_rise names task '{task}', which was not evaluated "
                          f"(evaluated: {', '.join(sorted({r.task for r in rows}))})"])
    if metric is None:
        return candidates[0]
    for row in candidates:
        if metric in (row.metric, row.metric.split(",", 1)[0]):
            return row
    raise GateFailed([f"gate require_rise names metric '{metric}' of task '{task}', which reports only "
                      f"{', '.join(r.metric for r in candidates)}"])


def check_gate(rows: list[Delta], gate: GateConfig) -> None:
    """Raise GateFailed listing every violated rule, with the task, the metric and both scores."""
    failures = []
    if gate.max_drop is not None:
        for row in rows:
            if row.drop > gate.max_drop:
                failures.append(
                    f"{row.task} {row.metric} dropped {_fmt_against(row.drop, gate.max_drop)} points "
                    f"({_fmt(row.base)} -> {_fmt(row.tuned)}), gate allows {gate.max_drop:g}"
                )
    if gate.require_rise is not None:
        rule = gate.require_rise
        row = _pick(rows, rule.task, rule.metric)
        if -row.drop < rule.by:
            failures.append(
                f"{row.task} {row.metric} rose {_fmt_against(-row.drop, rule.by)} points "
                f"({_fmt(row.base)} -> {_fmt(row.tuned)}), gate requires a rise of at least {rule.by:g}"
            )
    if failures:
        raise GateFailed(failures)


def recovery(bf16: list[Score], w4: list[Score]) -> list[Recovery]:
    """How much of each bf16 score the 4-bit model keeps, in percent (direction-aware)."""
    rows = []
    for ref, quant in _matched(bf16, w4):
        numerator, denominator = (quant.value, ref.value) if ref.higher_is_better else (ref.value, quant.value)
        pct = 100 * numerator / denominator if denominator else None
        rows.append(Recovery(quant.task, quant.metric, ref.value, quant.value, pct))
    return rows


def table_rows(rows: Sequence[Score | Delta | Recovery | dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for ctx.tables / Prefect table artifacts: plain dicts, floats rounded to 2 decimals."""
    return [{k: round(v, 2) if isinstance(v, float) else v for k, v in (row if isinstance(row, dict) else
             asdict(row)).items()} for row in rows]


def markdown_table(rows: Sequence[Score | Delta | Recovery | dict[str, Any]]) -> str:
    """A GitHub-flavoured markdown table of these row types or plain dict rows (Prefect markdown artifacts)."""
    dicts = table_rows(rows)
    if not dicts:
        return "_no rows_"
    headers = list(dicts[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(d[h]) for h in headers) + " |" for d in dicts]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)
