"""The one Prefect @task that wraps every stage: content-keyed caching, retries, logs, progress and UI artifacts.

Caching has two layers that agree on one key (finetune.stage.stage_key):
- Prefect's cache record (persisted in the store's results directory) answers a rerun without running the task;
- the store's artifact.json is the truth: before calling the task the flow checks it still verifies, and forces
  ``refresh_cache`` when it does not, so a deleted or altered file is recomputed rather than trusted.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.logging import get_run_logger
from prefect.states import State

from finetune.profile import Profile
from finetune.stage import TABLES_FILE, PermanentError, StageSpec, execute_stage, read_tables, stage_key
from finetune.store import Artifact, Store


@dataclass
class StageResult:
    artifact: Artifact
    cached: bool
    tables: dict[str, list[dict[str, Any]]]

    def summary(self) -> dict[str, Any]:
        return {
            "key": self.artifact.key,
            "cached": self.cached,
            "seconds": self.artifact.timings.get("seconds"),
            "path": self.artifact.path,
            "metrics": self.artifact.metrics,
        }


def _retry_unless_permanent(task, task_run, state: State) -> bool:
    """Retry transient failures and preemptions; bad input fails at once."""
    try:
        state.result()
    except PermanentError:
        return False
    except Exception:
        return True
    return False


def _artifact_key(text: str) -> str:
    # Prefect artifact keys allow lowercase letters, digits and dashes only.
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


@task(
    cache_key_fn=lambda context, parameters: f"{parameters['spec'].name}-{parameters['key']}",
    persist_result=True,
    retry_condition_fn=_retry_unless_permanent,
    retry_delay_seconds=5,
)
def run_stage_task(
    spec: StageSpec, key: str, profile: Profile, store_url: str, inputs: dict[str, Artifact]
) -> dict[str, Any]:
    logger = get_run_logger()
    progress_id = create_progress_artifact(0.0, description=f"{spec.name} {key[:10]}")

    def progress(fraction: float, message: str) -> None:
        update_progress_artifact(progress_id, min(100.0, max(0.0, 100.0 * fraction)), description=message)

    artifact, tables = execute_stage(
        spec, profile, Store(store_url), inputs, key=key, log_fn=logger.info, progress=progress)
    update_progress_artifact(progress_id, 100.0, description=f"{spec.name} done")
    return {"artifact": artifact.to_json() | {"path": artifact.path}, "tables": tables}


def run_stage(
    spec: StageSpec, profile: Profile, store: Store, inputs: dict[str, Artifact], label: str | None = None
) -> StageResult:
    """Run (or reuse) one stage from inside the flow and post its tables to the UI."""
    from flows.stage_flow import dispatch_to_gpu_pool  # imports this module

    label = label or spec.name
    key = stage_key(spec, profile, inputs)
    verified = store.verified_artifact(spec.name, key) is not None
    # GPU-bound stages of a deployed pipeline run as their own flow run in the GPU pool (flows/stage_flow.py).
    remote = None if verified else dispatch_to_gpu_pool(spec, profile, store, inputs, key, label)
    if remote is not None:
        tables = read_tables(store.materialize(remote, [TABLES_FILE]))
        return _post_tables(StageResult(artifact=remote, cached=False, tables=tables), label, store)
    state = run_stage_task.with_options(
        name=label,
        task_run_name=f"{label}-{key[:10]}",
        retries=profile.retries,
        refresh_cache=not verified,
        result_storage=store.results_dir(),
    )(spec=spec, key=key, profile=profile, store_url=store.url, inputs=inputs, return_state=True)
    payload = state.result()
    data = dict(payload["artifact"])
    artifact = Artifact.from_json(data, str(store.local_dir(spec.name, key)))
    # A Prefect cache hit never re-ran the task; a store hit ran it but found the artifact finished.
    cached = state.name == "Cached" or verified
    return _post_tables(StageResult(artifact=artifact, cached=cached, tables=payload["tables"]), label, store)


def _post_tables(result: StageResult, label: str, store: Store) -> StageResult:
    """Show a stage's tables and every PNG it made (loss curve, latency vs throughput) in the UI."""
    for name, rows in result.tables.items():
        if rows:
            create_table_artifact(rows, key=_artifact_key(f"{label}-{name}"), description=f"{label}: {name}")
    plots = [name for name in result.artifact.files if name.endswith(".png")]
    store.materialize(result.artifact, plots)
    for name in plots:
        encoded = base64.b64encode((Path(result.artifact.path) / name).read_bytes()).decode()
        create_markdown_artifact(f"![{name}](data:image/png;base64,{encoded})",
                                 key=_artifact_key(f"{label}-{Path(name).stem}"), description=f"{label}: {name}")
    return result
