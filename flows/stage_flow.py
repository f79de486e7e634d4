"""Flows that run in a GPU work pool, submitted by the ``finetune`` flow with ``run_deployment``.

- ``finetune-stage``: one GPU-bound stage (profile.deploy.gpu_stages) as its own flow run, so the pipeline's
  orchestration stays in the CPU pool while the stage gets a GPU pod (flows/dispatch.py says which). Inputs travel as
  artifact keys: the stage flow reads them from the shared store, checks that it computes the same stage key as the
  orchestrator (same code, same profile), runs the stage through the same cached task, and the orchestrator reads
  the verified artifact back.
- ``finetune-train-node``: one node of a multi-node training run (flows/node_runs.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from finetune import notice
from finetune.profile import load_profile
from finetune.run_params import check_attempts
from finetune.stage import PermanentError, StageContext, stage_key
from finetune.stage_lock import ServerLease
from finetune.store import Artifact, Store
from flows.dispatch import STAGE_FLOW
from flows.node_runs import NODE_FLOW, run_node
from flows.pipeline import spec
from flows.progress import StageProgress
from flows.stage_tasks import run_stage
from tasks.train.launch import ReadableMetrics


def _stage_run_name() -> str:
    params = flow_run.parameters
    return f"{params['label']}-{params['key'][:10]}"


@flow(name=STAGE_FLOW, flow_run_name=_stage_run_name, persist_result=True, result_serializer="json", log_prints=True)
def finetune_stage(
    stage: str,
    profile: str,
    overrides: list[str] | None,
    store: str,
    inputs: dict[str, list[str]],
    key: str,
    label: str,
) -> dict[str, Any]:
    """Run one pipeline stage here. ``inputs`` maps each input slot to [stage, key] of a finished artifact."""
    notice.install()  # a SIGTERM reaches the trainer in its task thread, then Prefect's handler (a reschedule)
    check_attempts(flow_run.run_count)
    resolved = load_profile(profile, overrides or [])
    stage_spec = spec(stage)
    artifacts_store = Store(store)
    artifacts: dict[str, Artifact] = {}
    for slot, (source_stage, source_key) in inputs.items():
        artifact = artifacts_store.verified_artifact(source_stage, source_key)
        if artifact is None:
            raise PermanentError(f"input '{slot}' ({source_stage}/{source_key}) is not a finished artifact in store "
                                 f"{store}: GPU pools must see the orchestrator's store (shared volume or object store)")
        artifacts[slot] = artifact
    computed = stage_key(stage_spec, resolved, artifacts)
    if computed != key:
        raise PermanentError(f"stage {label}: this worker computes key {computed[:12]}, the orchestrator {key[:12]}: "
                             "the GPU pool's image runs different code or profiles than the orchestrator")
    return run_stage(stage_spec, key, resolved, artifacts_store, artifacts, label=label).summary()


def _node_run_name() -> str:
    params = flow_run.parameters
    return f"{Path(params['workdir']).name[:8]}-node-{params['node_rank']}"


@flow(name=NODE_FLOW, flow_run_name=_node_run_name, log_prints=True)
def train_node(profile: str, overrides: list[str] | None, workdir: str, node_rank: int, rendezvous: str,
               lease: dict[str, Any] | None = None) -> None:
    """One node of a multi-node training run; its trainer rendezvous with the other nodes' (flows/node_runs.py).
    ``lease``: the train stage's server lease on its key (a ServerLease's fields), renewed while this node trains."""
    check_attempts(flow_run.run_count)
    progress = StageProgress(f"train node {node_rank}")
    ctx = StageContext(profile=load_profile(profile, overrides or []), key=Path(workdir).name, workdir=Path(workdir),
                       inputs={}, log=ReadableMetrics(get_run_logger().info), progress=progress)
    run_node(ctx, node_rank, rendezvous, ServerLease(**lease) if lease else None)
    progress(1.0, f"train node {node_rank} done")
    progress.close()
