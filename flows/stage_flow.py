"""Flows that run in a GPU work pool, submitted by the ``finetune`` flow with ``run_deployment``.

- ``finetune-stage``: one GPU-bound stage (profile.deploy.gpu_stages) as its own flow run, so the pipeline's
  orchestration stays in the CPU pool while the stage gets a GPU pod. Inputs travel as artifact keys: the stage flow
  reads them from the shared store, checks that it computes the same stage key as the orchestrator (same code, same
  profile), runs the stage through the same cached task, and the orchestrator reads the verified artifact back.
- ``finetune-train-node``: one node of a multi-node training run (flows/multinode.py).

Dispatch rule (``dispatch_to_gpu_pool``, called by flows.stage_tasks.run_stage): a stage in deploy.gpu_stages that
is not finished yet goes to ``finetune-stage/<deploy.gpu_work_pool>`` when the pipeline runs from a deployment whose
work pool is another pool, or when FINETUNE_GPU_DISPATCH=always (to exercise the path on one pool). Run directly,
or on the embedded default whose two pools are the same local pool, stages run in the pipeline's own process.
Training with launcher 'prefect-pool' is never dispatched: its node runs are the GPU work.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import deployment, flow_run

from finetune.profile import Profile, load_profile
from finetune.stage import PermanentError, StageContext, StageSpec, stage_key
from finetune.store import Artifact, Store

STAGE_FLOW = "finetune-stage"
DISPATCH_ENV = "FINETUNE_GPU_DISPATCH"


def _stage_run_name() -> str:
    params = flow_run.parameters
    return f"{params['label']}-{params['key'][:10]}"


@flow(name=STAGE_FLOW, flow_run_name=_stage_run_name, persist_result=True, log_prints=True)
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
    from flows.stage_tasks import run_stage

    resolved = load_profile(profile, overrides or [])
    spec: StageSpec = importlib.import_module(f"tasks.{stage}").SPEC
    artifacts_store = Store(store)
    artifacts: dict[str, Artifact] = {}
    for slot, (source_stage, source_key) in inputs.items():
        artifact = artifacts_store.verified_artifact(source_stage, source_key)
        if artifact is None:
            raise PermanentError(f"input '{slot}' ({source_stage}/{source_key}) is not a finished artifact in store "
                                 f"{store}: GPU pools must see the orchestrator's store (shared volume or object store)")
        artifacts[slot] = artifact
    computed = stage_key(spec, resolved, artifacts)
    if computed != key:
        raise PermanentError(f"stage {label}: this worker computes key {computed[:12]}, the orchestrator {key[:12]}: "
                             "the GPU pool's image runs different code or profiles than the orchestrator")
    return run_stage(spec, resolved, artifacts_store, artifacts, label=label).summary()


def _node_run_name() -> str:
    params = flow_run.parameters
    return f"{Path(params['workdir']).name[:8]}-node-{params['node_rank']}"


@flow(name="finetune-train-node", flow_run_name=_node_run_name, log_prints=True)
def train_node(profile: str, overrides: list[str] | None, workdir: str, node_rank: int, rendezvous: str) -> None:
    """One node of a multi-node training run; its trainer rendezvous with the other nodes' (flows/multinode.py)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from flows.multinode import run_node

    logger = get_run_logger()
    progress_id = create_progress_artifact(0.0, description=f"train node {node_rank}")

    def progress(fraction: float, message: str) -> None:
        update_progress_artifact(progress_id, min(100.0, max(0.0, 100.0 * fraction)), description=message)

    ctx = StageContext(profile=load_profile(profile, overrides or []), key=Path(workdir).name, workdir=Path(workdir),
                       inputs={}, log=logger.info, progress=progress)
    run_node(ctx, node_rank, rendezvous)
    update_progress_artifact(progress_id, 100.0, description=f"train node {node_rank} done")


# -- the dispatch hook ----------------------------------------------------------------------------------------------
def gpu_pool_target(spec: StageSpec, profile: Profile) -> str | None:
    """The ``finetune-stage`` deployment this stage should run on, or None to run it in this process."""
    if spec.name not in profile.deploy.gpu_stages or flow_run.flow_name == STAGE_FLOW:
        return None
    if spec.name == "train" and profile.train.launcher == "prefect-pool":
        return None
    deployment_id = deployment.id
    if deployment_id is None:
        return None  # a direct `finetune run`: everything local
    target = f"{STAGE_FLOW}/{profile.deploy.gpu_work_pool}"
    if os.environ.get(DISPATCH_ENV) == "always":
        return target
    return target if _current_work_pool(deployment_id) != profile.deploy.gpu_work_pool else None


def _current_work_pool(deployment_id: str) -> str | None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment(deployment_id).work_pool_name


def dispatch_to_gpu_pool(
    spec: StageSpec, profile: Profile, store: Store, inputs: dict[str, Artifact], key: str, label: str
) -> Artifact | None:
    """Run the stage as a flow run in the profile's GPU pool and return its verified artifact; None: run it here."""
    from prefect.deployments import run_deployment

    from flows.multinode import pool_job_variables

    target = gpu_pool_target(spec, profile)
    if target is None:
        return None
    params = flow_run.parameters
    logger = get_run_logger()
    logger.info(f"{label}: submitting to {target}")
    run = run_deployment(
        target,
        parameters={"stage": spec.name, "profile": params["profile"], "overrides": params.get("overrides") or [],
                    "store": store.url, "inputs": {slot: [a.stage, a.key] for slot, a in inputs.items()},
                    "key": key, "label": label},
        job_variables=pool_job_variables(profile),
        tags=["finetune-stage", label],
        poll_interval=2,
    )
    if run.state is None or not run.state.is_completed():
        name = run.state.name if run.state else "unknown"
        raise RuntimeError(f"stage {label} on {target} (flow run {run.name}) ended {name}: "
                           f"{run.state.message if run.state else ''}")
    artifact = store.verified_artifact(spec.name, key)
    if artifact is None:
        raise RuntimeError(f"stage {label} completed on {target} but {spec.name}/{key} is not a verified artifact in "
                           f"{store.url}: the GPU pool writes to a different store")
    return artifact
