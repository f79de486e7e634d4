"""The ``finetune`` flow: profile -> download -> pack -> train -> convert -> evaluate -> quantize -> benchmark.

``download`` runs before ``pack`` because packing applies the model's own tokenizer and chat template.
Every stage is content-keyed (see flows/stage_tasks.py), so a rerun picks up exactly where work stopped.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from finetune.hashing import hash_json
from finetune.profile import REPO_ROOT, load_profile, resolved_yaml
from finetune.store import Store
from flows.stage_tasks import StageResult, run_stage

# Stage order of the pipeline; `until` stops after the named one.
STAGES = ("download", "pack", "train", "convert", "evaluate", "quantize", "benchmark")


def default_store_url() -> str:
    return os.environ.get("FINETUNE_STORE", str(REPO_ROOT / ".store"))


def _run_name() -> str:
    params = flow_run.parameters
    profile = load_profile(params["profile"], params.get("overrides") or [])
    return f"{profile.name}-data-{hash_json(_spec('pack').fingerprint(profile), 8)}"


def _spec(stage: str):
    return importlib.import_module(f"tasks.{stage}").SPEC


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row.get(col, "")) for col in header) + " |" for row in rows]
    return "\n".join(lines)


@flow(name="finetune", flow_run_name=_run_name, persist_result=True, log_prints=True)
def finetune(
    profile: str = "tiny-cpu",
    overrides: list[str] | None = None,
    store: str | None = None,
    until: str = "benchmark",
) -> dict[str, Any]:
    """Run the pipeline for one profile. Returns per stage: key, cached, seconds, path, metrics."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {', '.join(STAGES)}, got {until!r}")
    resolved = load_profile(profile, overrides or [])
    artifacts_store = Store(store or default_store_url())
    create_markdown_artifact(
        f"# Profile `{resolved.name}`\n\n{resolved.description}\n\n```yaml\n{resolved_yaml(resolved)}```",
        key="resolved-profile", description="The fully resolved profile this run used")
    results: dict[str, StageResult] = {}
    wanted = STAGES[: STAGES.index(until) + 1]

    def stage(name: str, inputs: dict[str, str], label: str | None = None) -> StageResult:
        result = run_stage(_spec(name), resolved, artifacts_store,
                           {slot: results[src].artifact for slot, src in inputs.items()}, label=label)
        results[label or name] = result
        return result

    stage("download", {})
    if "pack" in wanted:
        stage("pack", {"download": "download"})
    summary = {name: result.summary() for name, result in results.items()}
    _post_lineage(resolved.name, artifacts_store, results)
    return summary


def _post_lineage(profile_name: str, store: Store, results: dict[str, StageResult]) -> None:
    rows = [{"stage": name, "key": r.artifact.key, "cached": r.cached, "seconds": r.artifact.timings.get("seconds"),
             "inputs": ", ".join(f"{k}:{v[:10]}" for k, v in r.artifact.inputs.items())}
            for name, r in results.items()]
    create_markdown_artifact(
        f"# Lineage of `{profile_name}`\n\nStore: `{store.url}`\n\n{_markdown_table(rows)}\n",
        key="lineage", description="Which artifact came from which inputs")


def artifact_dir(summary: dict[str, Any], stage: str) -> Path:
    return Path(summary[stage]["path"])
