"""Which stages of a deployed pipeline run as their own flow run in the GPU work pool, and how they are submitted.

Dispatch rule (``gpu_pool_target``): a stage in deploy.gpu_stages goes to ``finetune-stage/<deploy.gpu_work_pool>``
when the pipeline runs from a deployment whose work pool is another pool, or when FINETUNE_GPU_DISPATCH=always (to
exercise the path on one pool). Run directly, or on the embedded default whose two pools are the same local pool,
stages run in the pipeline's own process. Training with launcher 'prefect-pool' is never dispatched: its node runs
are the GPU work.
"""

from __future__ import annotations

import os
import time

from prefect import get_run_logger
from prefect.runtime import deployment, flow_run

from finetune.profile import Profile
from finetune.run_params import run_overrides
from finetune.stage import StageSpec
from finetune.store import Artifact, Store
from flows.pickup import CrashGrace, NotPickedUp, PickupWatch, pickup_bound_s

STAGE_FLOW = "finetune-stage"
DISPATCH_ENV = "FINETUNE_GPU_DISPATCH"
POLL_S = 2.0


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
    """Run the stage as a flow run of deployment ``target`` and return its verified artifact. The wait says what it
    waits for and is bounded while no worker takes the run (flows.pickup)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled

    params = flow_run.parameters
    log = get_run_logger().info
    pool, bound = profile.deploy.gpu_work_pool, pickup_bound_s(profile)
    run = run_deployment(
        target,
        parameters={"stage": spec.name, "profile": params["profile"], "overrides": run_overrides(params),
                    "store": store.url, "inputs": {slot: [a.stage, a.key] for slot, a in inputs.items()},
                    "key": key, "label": label},
        job_variables=profile.gpu_job_variables | profile.deploy.stage_image(spec.name),
        tags=[STAGE_FLOW, label],
        timeout=0,
    )
    log(f"{label}: submitted as flow run {run.name} of {target}; waiting for it to finish (for a worker of pool "
        f"{pool} to take it: at most {bound:.0f} s)")
    watch, crashed, seen = PickupWatch(pool, bound), CrashGrace(), None
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run.id)
            if run.state is None:
                raise RuntimeError(f"flow run {run.name} of {target} has no state")
            if run.state.name != seen:
                seen = run.state.name
                log(f"{label}: flow run {run.name} on {target}: {seen}")
            if run.state.is_completed() or crashed.ended_badly(run.id, run.state.type.value):
                break
            try:
                watch.check(run.id, run.state.type.value, run.state.name, f"stage {label} (flow run {run.name})")
            except NotPickedUp as exc:
                client.set_flow_run_state(run.id, Cancelled(message=str(exc)), force=True)
                raise
            time.sleep(POLL_S)
    if not run.state.is_completed():
        raise RuntimeError(f"stage {label} on {target} (flow run {run.name}) ended {run.state.name}: "
                           f"{run.state.message or ''}")
    artifact = store.verified_artifact(spec.name, key)
    if artifact is None:
        raise RuntimeError(f"stage {label} completed on {target} but {spec.name}/{key} is not a verified artifact in "
                           f"{store.url}: the GPU pool writes to a different store")
    return artifact
