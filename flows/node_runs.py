"""Multi-node training on a Prefect GPU work pool: one flow run per node, placed by the pool's worker (never
hand-rolled SSH).

``train.launcher: prefect-pool``: the train stage (running in the CPU orchestration flow) writes the training config
into its directory in the store, then submits one ``finetune-train-node/<gpu pool>`` flow run per node with
``run_deployment``. Node 0 publishes its ``host:port`` in a Prefect Variable named after the rendezvous id (one per
attempt of the stage); the other nodes read it there, and all of them start ``tune run`` with torchrun's c10d
rendezvous at that endpoint (elastic node range and max restarts from ``train.elastic``). The stage waits for every
node run: one that ends Failed, Crashed or Cancelled fails the stage and the others are cancelled. A node run that is
rescheduled after a SIGTERM (spot preemption: node runs execute under `prefect flow-run execute` with SIGTERM ->
reschedule, see deployments/kubernetes-gpu-pool.json) only passes through AwaitingRetry, which the stage waits out:
the other nodes' torchrun agents restart their workers and wait in the rendezvous, the rescheduled run reads the same
endpoint and joins, and the recipe resumes from the newest checkpoint in the shared store. Node 0 hosts the
rendezvous store, so its loss fails the other nodes and the stage is retried as a whole.

The node runs are the ``finetune-train-node`` flow (flows/stage_flow.py), which calls ``run_node`` here. Each gets
the stage's server lease on its key and renews it while it trains (flows/server_lease.py), so the key stays taken
while any node trains, even after the orchestrating run was killed.

The store must be a directory every node mounts at the same path (a shared volume): the trainers write their
checkpoints into the train stage's directory.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from finetune.procs import free_port
from finetune.profile import Profile
from finetune.run_params import run_overrides
from finetune.stage import PermanentError, StageContext
from finetune.stage_lock import LeaseLost, ServerLease
from finetune.store import Store
from flows.pickup import CrashGrace, PickupWatch, pickup_bound_s
from flows.server_lease import renew_server_lease
from tasks.train.launch import NODE_ADDR_ENV, check_devices, launch_trainers, node_command, report_step, tune_executable
from tasks.train.launchers import Launcher, register
from tunerecipes.checkpoint_layout import CONFIG_FILE, METRICS_FILE, read_records

NODE_FLOW = "finetune-train-node"
# How long a node waits for node 0's endpoint (GPU nodes may have to be provisioned first).
ENDPOINT_TIMEOUT_S = float(os.environ.get("FINETUNE_RDZV_TIMEOUT_S", "1800"))
POLL_S = 1.0


class NodeFailed(RuntimeError):
    """A node run of a multi-node training ended without completing (the stage is retried as a whole)."""


def check_shared_store(profile: Profile, store: Store) -> None:
    """Pool node runs read the training config and write checkpoints by path: the store must be a directory every
    node mounts (checked before anything is downloaded onto the orchestrator)."""
    if profile.train.launcher == "prefect-pool" and not store.is_local:
        raise PermanentError(f"train.launcher 'prefect-pool' needs the store to be a directory every node mounts at "
                             f"the same path (a shared volume); {store.url} is an object store URL. Mount it as a "
                             "file system on every node and pass that path, or use train.launcher skypilot/jobset")


def node_deployment(profile: Profile) -> str:
    return f"{NODE_FLOW}/{profile.deploy.gpu_work_pool}"


def variable_name(rdzv_id: str) -> str:
    return f"finetune-rdzv-{rdzv_id}"


# -- coordinator: the train stage ---------------------------------------------------------------------------------
def train_on_pool(ctx: StageContext, config_path: Path) -> None:
    """Run the training described by ``config_path`` (in ctx.workdir) as one flow run per node in the GPU pool."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run
    from prefect.variables import Variable

    profile = ctx.profile
    params = flow_run.parameters or {}
    if "profile" not in params:
        raise PermanentError("train.launcher 'prefect-pool' runs inside the finetune flow (it names the profile "
                             "for the node runs)")
    rdzv_id = f"{ctx.key[:12]}-{uuid.uuid4().hex[:8]}"  # fresh per attempt: a retry never meets stale nodes
    deployment = node_deployment(profile)
    ctx.log(f"submitting {profile.train.nnodes} node runs to {deployment} (rendezvous {rdzv_id})")
    runs = []
    try:
        for rank in range(profile.train.nnodes):
            runs.append(run_deployment(
                deployment,
                parameters={"profile": params["profile"], "overrides": run_overrides(params),
                            "workdir": str(ctx.workdir), "node_rank": rank, "rendezvous": rdzv_id,
                            "lease": asdict(ctx.server_lease) if ctx.server_lease else None},
                flow_run_name=f"{profile.name}-train-{ctx.key[:8]}-node-{rank}",
                job_variables=profile.gpu_job_variables,
                tags=[NODE_FLOW, f"rdzv-{rdzv_id}"],
                timeout=0,
            ))
        ctx.log(f"waiting for the {len(runs)} node runs to finish (for workers of pool {profile.deploy.gpu_work_pool} "
                f"to take them: at most {pickup_bound_s(profile):.0f} s each)")
        with get_client(sync_client=True) as client:
            _wait_for_nodes(ctx, client, [run.id for run in runs], config_path.parent,
                            PickupWatch(profile.deploy.gpu_work_pool, pickup_bound_s(profile)))
    finally:
        with get_client(sync_client=True) as client:
            _cancel_unfinished(client, [run.id for run in runs])
        Variable.unset(variable_name(rdzv_id))



register(Launcher("prefect-pool", train_on_pool, trains_here=False))

def _wait_for_nodes(ctx: StageContext, client: Any, run_ids: list[uuid.UUID], workdir: Path,
                    pickup: PickupWatch) -> None:
    seen: dict[uuid.UUID, str] = {}
    crashed = CrashGrace()
    while True:
        states = {}
        for rank, run_id in enumerate(run_ids):
            run = client.read_flow_run(run_id)
            states[run_id] = run.state
            name = run.state.name if run.state else "Unknown"
            if seen.get(run_id) != name:
                ctx.log(f"node {rank} ({run.name}): {name}")
                seen[run_id] = name
            if run.state is not None and crashed.ended_badly(run_id, run.state.type.value):
                raise NodeFailed(f"node {rank} of {len(run_ids)} ({run.name}, flow run {run_id}) ended "
                                 f"{name}: {run.state.message or 'no message'}; cancelling the other nodes")
            if run.state is not None:
                pickup.check(run_id, run.state.type.value, name, f"node {rank} (flow run {run.name})")
        if all(state is not None and state.is_completed() for state in states.values()):
            return
        _report_progress(ctx, workdir)
        time.sleep(POLL_S)


def _report_progress(ctx: StageContext, workdir: Path) -> None:
    """The coordinator has no trainer output of its own: follow rank 0's metrics file in the shared store."""
    if records := read_records(workdir / METRICS_FILE):
        report_step(ctx, records[-1])


def _cancel_unfinished(client: Any, run_ids: list[uuid.UUID]) -> None:
    """Cancel as the UI does: propose Cancelling and let Prefect's rules finish it. The server turns it into
    Cancelled for a run no worker has started; otherwise the worker stops the run's process. (Forcing Cancelled on a
    run a worker is submitting lost the race: its engine then moved Cancelled -> Running, a state Prefect lets a
    rerun leave, and trained on alone.)"""
    from prefect.states import Cancelling

    for run_id in run_ids:
        state = client.read_flow_run(run_id).state
        if state is None or state.is_final():
            continue
        client.set_flow_run_state(run_id, Cancelling(message="another node of this training failed"))


# -- one node -----------------------------------------------------------------------------------------------------
def run_node(ctx: StageContext, node_rank: int, rdzv_id: str, lease: ServerLease | None = None) -> None:
    """This node's trainer for the training whose config is in ctx.workdir; node 0 publishes the endpoint.

    ``lease``: the train stage's server lease on its key, renewed here while the trainer runs, so the key stays taken
    while any node trains even if the run that submitted the nodes was killed; a lease this node cannot renew (gone,
    revoked, server unreachable for half a lease) stops its trainer at once and fails the node run (``LeaseLost``)."""
    check_devices(ctx.profile.train)
    config_path = Path(ctx.workdir) / CONFIG_FILE
    if not config_path.is_file():
        raise PermanentError(f"{config_path} not found: every node must mount the artifact store at the same path "
                             "(a shared volume) as the train stage that wrote it")
    with contextlib.ExitStack() as stack:
        if lease is not None:
            where = f"train {ctx.key[:12]} node {node_rank}"
            lost = stack.enter_context(renew_server_lease(lease, where, ctx.log))
            ctx = replace(ctx, stop=lost)
            ctx.log(f"{where}: renewing the stage's lease on {lease.name} while this node trains")
        endpoint = publish_endpoint(rdzv_id) if node_rank == 0 else await_endpoint(rdzv_id)
        ctx.log(f"node {node_rank}: rendezvous {rdzv_id} at {endpoint}")
        # Node 0 hosts the rendezvous store, so a preempted node of another rank leaves it standing and rejoins it.
        command = node_command(ctx.profile.train, config_path, endpoint, rdzv_id, tune=tune_executable(),
                               is_host=node_rank == 0)
        try:
            launch_trainers(ctx, [command])
        finally:
            if lease is not None and ctx.stop is not None and ctx.stop.is_set():
                # Whatever the trainer's exit said, the lost lease is the cause (and a finished one is no success).
                raise LeaseLost(f"node {node_rank}: lost the lease on {lease.name}; its trainer was stopped")


def node_address() -> str:
    """The address other nodes reach this one at: the pod IP on Kubernetes (FINETUNE_NODE_ADDR), else the host's."""
    if addr := os.environ.get(NODE_ADDR_ENV):
        return addr
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def publish_endpoint(rdzv_id: str) -> str:
    from prefect.variables import Variable

    addr = node_address()
    endpoint = f"{addr}:{free_port(addr)}"
    # Overwrite: a rescheduled node 0 may come back on another host.
    Variable.set(variable_name(rdzv_id), endpoint, overwrite=True, tags=["finetune-rendezvous"])
    return endpoint


def await_endpoint(rdzv_id: str, timeout_s: float = ENDPOINT_TIMEOUT_S) -> str:
    from prefect.variables import Variable

    deadline = time.monotonic() + timeout_s
    while (endpoint := Variable.get(variable_name(rdzv_id))) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"node 0 of rendezvous {rdzv_id} did not publish its endpoint within {timeout_s:.0f}s")
        time.sleep(POLL_S)
    return str(endpoint)
