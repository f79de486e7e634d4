"""The one Prefect @task that wraps every stage: content-keyed caching, retries, logs, progress and UI artifacts.

Caching has two layers that agree on one key (finetune.stage.stage_key):
- Prefect's cache record (persisted in the store's results directory) answers a rerun without running the task;
- the store's artifact.json is the truth: before submitting the task the flow checks it still verifies, and forces
  ``refresh_cache`` when it does not, so a deleted or altered file is recomputed rather than trusted.

Stages are submitted as futures: a task receives its upstream tasks' futures as inputs, so Prefect starts it when
they finish and draws the dependency in the run graph. Each running stage holds one slot of its pool's concurrency
limit (flows/slots.py), so stages that share a machine take turns.
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.concurrency.sync import concurrency
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import State

from finetune import notice
from finetune.console import stage_event
from finetune.profile import Profile
from finetune.stage import TABLES_FILE, PermanentError, StageSpec, execute_stage, read_tables
from finetune.stage_lock import identity
from finetune.store import Artifact, Store
from flows import node_runs  # noqa: F401  (registers train.launcher 'prefect-pool', tasks/train/launchers.py)
from flows.dispatch import dispatch_to_gpu_pool
from flows.progress import StageProgress
from flows.server_lease import server_lock
from tasks.train.launch import ReadableMetrics

Payload = dict[str, Any]
"""What the stage task returns (and Prefect caches): the artifact's JSON with its path, and its UI tables."""


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
    """Retry transient failures and preemptions; bad input fails at once, and nothing is retried in a process that
    got a spot notice (the machine is going: the run resumes when the run itself is retried)."""
    if notice.received() is not None:
        return False
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


def payload_artifact(payload: Payload, store: Store) -> Artifact:
    data = payload["artifact"]
    return Artifact.from_json(data, str(store.local_dir(data["stage"], data["key"])))


def _payload(artifact: Artifact, tables: dict[str, list[dict[str, Any]]]) -> Payload:
    return {"artifact": artifact.to_json() | {"path": artifact.path}, "tables": tables}


@task(
    cache_key_fn=lambda context, parameters: f"{parameters['spec'].name}-{parameters['key']}",
    persist_result=True,
    # JSON, not pickle: the results live in the store, and whoever can write a store must not run code here.
    result_serializer="json",
    retry_condition_fn=_retry_unless_permanent,
    retry_delay_seconds=5,
    # Stages log through ctx.log. Turning library print() calls into log records (the flow's log_prints) also
    # catches dill's dis.dis under its own stdout capture (datasets' fingerprinting): pages of bytecode in the log.
    log_prints=False,
)
def run_stage_task(
    spec: StageSpec, key: str, profile: Profile, store_url: str, inputs: dict[str, Payload | Artifact],
    input_keys: dict[str, str], label: str, gpu_pool: str | None, slot: str | None,
) -> Payload:
    """Run (or reuse) one stage. ``inputs`` are upstream payloads (resolved from their futures) or artifacts;
    ``input_keys`` the keys ``key`` was computed from; ``gpu_pool`` names the finetune-stage deployment to run it on
    instead of here; ``slot`` the concurrency limit whose slot it holds while it works."""
    store = Store(store_url)
    artifacts = {name: value if isinstance(value, Artifact) else payload_artifact(value, store)
                 for name, value in inputs.items()}
    # The inputs' keys, not the whole key again: that would fingerprint outside content (a local base model's
    # files) once more per task.
    if (found := {name: artifact.key for name, artifact in artifacts.items()}) != input_keys:
        raise RuntimeError(f"{label}: inputs {found} are not the ones its key {key[:12]} was computed from "
                           f"({input_keys}): a bug")
    logger = get_run_logger()
    finished = store.verified_artifact(spec.name, key) is not None
    # A finished stage only reads its artifact: it takes no slot, so a cached rerun does not queue its stages behind
    # the pool's limit (a fully cached deployment run spent ~35 s of 59 s waiting for slots, issue 25).
    with _holding(None if finished else slot, logger.info):
        if gpu_pool is not None and not finished and store.verified_artifact(spec.name, key) is None:
            remote = dispatch_to_gpu_pool(spec, profile, store, artifacts, key, label, gpu_pool)
            return _payload(remote, read_tables(store.materialize(remote, [TABLES_FILE])))
        stage_event(label, "running", key[:10])
        # People read this log in the UI: per-step trainer metrics become one line every 10 steps or 60 s.
        progress = StageProgress(f"{label} {key[:10]}", label)
        artifact, tables = execute_stage(spec, profile, store, artifacts, key=key, log_fn=ReadableMetrics(logger.info),
                                         progress=progress, run=_this_run(),
                                         server_lock=server_lock(profile.retries.lock_lease_s))
        progress.close()
    payload = _payload(artifact, tables)
    # Computed by another run (one that held the key's lock while this task waited): a cache hit for this run.
    payload["reused"] = artifact.timings.get("computed_by") != identity(_this_run())
    return payload


def _this_run() -> str:
    """This flow run as other runs waiting for one of its stages see it: name and id."""
    return f"flow run {flow_run.name} ({flow_run.id})" if flow_run.id else ""


@contextlib.contextmanager
def _holding(slot: str | None, log: Callable[[str], None]) -> Iterator[None]:
    """Hold one slot of the pool's concurrency limit while the stage works (the task run is already Running while
    it waits, so the wait is logged)."""
    if slot is None:
        yield
        return
    started = time.monotonic()
    with concurrency(slot, occupy=1, strict=True):
        if (waited := time.monotonic() - started) > 1.0:
            log(f"waited {waited:.1f} s for a free slot of concurrency limit {slot}")
        yield


@dataclass
class Submitted:
    label: str
    key: str
    future: PrefectFuture
    verified: bool
    """The store already held this stage's finished artifact when it was submitted."""


def submit_stage(
    spec: StageSpec, key: str, profile: Profile, store: Store, inputs: Mapping[str, Submitted | Artifact],
    label: str, *, gpu_pool: str | None = None, slot: str | None = None, wait_for: list[PrefectFuture] | None = None,
) -> Submitted:
    """Submit one stage: it starts when its inputs (submitted stages' futures, or artifacts) and ``wait_for`` have
    finished."""
    existing = store.verified_artifact(spec.name, key)
    if existing is not None and not spec.still_valid(existing):
        store.set_aside(spec.name, key)  # e.g. the published files changed: publish again
        existing = None
    verified = existing is not None
    future = run_stage_task.with_options(
        name=label,
        task_run_name=f"{label}-{key[:10]}",
        retries=profile.retries.count,
        refresh_cache=not verified,
        result_storage=store.results_dir(),
    ).submit(spec=spec, key=key, profile=profile, store_url=store.url,
             inputs={name: value if isinstance(value, Artifact) else value.future for name, value in inputs.items()},
             input_keys={name: value.key for name, value in inputs.items()}, label=label, gpu_pool=gpu_pool,
             slot=slot, wait_for=wait_for or [])
    return Submitted(label, key, future, verified)


def stage_result(submitted: Submitted, store: Store) -> StageResult:
    """The finished stage's result (raises its failure), with its tables and plots posted to the UI."""
    payload = submitted.future.result()
    # A Prefect cache hit never re-ran the task; a store hit ran it but found the artifact already finished (or
    # waited while another run computed it).
    cached = submitted.future.state.name == "Cached" or submitted.verified or payload.get("reused", False)
    result = StageResult(artifact=payload_artifact(payload, store), cached=cached, tables=payload["tables"])
    return _post_tables(result, submitted.label, store)


def run_stage(spec: StageSpec, key: str, profile: Profile, store: Store, inputs: dict[str, Artifact],
              label: str) -> StageResult:
    """Run one stage, whose key the caller computed, here and now (the GPU pool's stage flow): same task, same
    caching."""
    return stage_result(submit_stage(spec, key, profile, store, inputs, label), store)


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
