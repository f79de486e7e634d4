"""Which stages of a deployed pipeline run as their own flow run in the GPU work pool, and how they are submitted.

Dispatch rule (``gpu_pool_target``): a stage in deploy.gpu_stages goes to ``finetune-stage/<deploy.gpu_work_pool>``
when the pipeline runs from a deployment whose work pool is another pool, or when FINETUNE_GPU_DISPATCH=always (to
exercise the path on one pool). Run directly, or on the embedded default whose two pools are the same local pool,
stages run in the pipeline's own process. Training with launcher 'prefect-pool' is never dispatched: its node runs
are the GPU work.
"""

from __future__ import annotations

import os

from prefect import get_run_logger
from prefect.runtime import deployment, flow_run

from finetune.profile import Profile
from finetune.run_params import run_overrides
from finetune.stage import StageSpec
from finetune.store import Artifact, Store

STAGE_FLOW = "finetune-stage"
DISPATCH_ENV = "FINETUNE_GPU_DISPATCH"


def gpu_pool_target(stage: str, profile: Profile) -> str | None:
    """The ``finetune-stage`` deployment this stage should run on, or None to run it in this process."""
    if stage not in profile.deploy.gpu_stages or flow_run.flow_name == STAGE_FLOW:
        return None
    if stage == "train" and profile.train.launcher == "prefect-pool":
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
    spec: StageSpec, profile: Profile, store: Store, inputs: dict[str, Artifact], key: str, label: str, target: str,
) -> Artifact:
    """Run the stage as a flow run of deployment ``target`` and return its verified artifact."""
    from prefect.deployments import run_deployment

    params = flow_run.parameters
    get_run_logger().info(f"{label}: submitting to {target}")
    run = run_deployment(
        target,
        parameters={"stage": spec.name, "profile": params["profile"], "overrides": run_overrides(params),
                    "store": store.url, "inputs": {slot: [a.stage, a.key] for slot, a in inputs.items()},
                    "key": key, "label": label},
        job_variables=profile.gpu_job_variables | profile.deploy.stage_image(spec.name),
        tags=[STAGE_FLOW, label],
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
