"""The deployments on a real Prefect server (SQLite) with two process workers, as a user runs them.

One session fixture starts the server on a free loopback port, creates the work pools from deployments/, starts two
workers on the local pool and runs `prefect deploy --all`; every test shares it, and every process it started is
stopped at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune.profile import REPO_ROOT
from flows.local_cluster import LocalPrefect, start_cluster
from flows.rehearse import flow_run_process
from tunerecipes.checkpoint_layout import last_logged_step

pytestmark = pytest.mark.e2e


# Module-scoped: idle, its server and workers still take ~10% of a core (measured), which the later tests need.
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPrefect]:
    # Expired stage-key leases are revoked within a second (15 s by default): takeover times are the lease's.
    # The scheduler looks for due schedules every 2 s (60 s by default) and plans only the next run of each.
    started = start_cluster(tmp_path_factory.mktemp("prefect-cluster"),
                            {"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
                             "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
                             "PREFECT_SERVER_SERVICES_SCHEDULER_MIN_RUNS": "1",
                             "PREFECT_SERVER_SERVICES_SCHEDULER_MAX_RUNS": "1"})
    yield started
    started.stop()
    leftovers = [n for n, p in started.procs.items() if p.returncode is None]
    assert not leftovers, f"still running after shutdown: {leftovers}"


def expected_deployments() -> set[str]:
    flows = {"flows.finetune:finetune": "finetune", "flows.finetune:finetune_production": "finetune",
             "flows.stage_flow:finetune_stage": "finetune-stage", "flows.stage_flow:train_node": "finetune-train-node"}
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    return {f"{flows[d['entrypoint']]}/{d['name']}" for d in config["deployments"]}


def test_deploy_all_registers_every_deployment_with_pools_and_inactive_schedules(cluster: LocalPrefect) -> None:
    flows = {f["id"]: f["name"] for f in cluster.api("POST", "/flows/filter", {})}
    deployments = cluster.api("POST", "/deployments/filter", {})
    by_name = {f"{flows[d['flow_id']]}/{d['name']}": d for d in deployments}
    assert set(by_name) == expected_deployments()
    # Pools created first (deployments/create-pools.sh): nothing skipped, nothing warned about.
    assert "does not exist" not in cluster.deploy_output and "Warning" not in cluster.deploy_output, \
        cluster.deploy_output[-3000:]
    assert by_name["finetune/maverick-sft"]["work_pool_name"] == "cpu-pool"
    assert by_name["finetune-stage/gpu-h200"]["work_pool_name"] == "gpu-h200"
    schedules = by_name["finetune/scout-lora"]["schedules"]
    assert len(schedules) == 1 and schedules[0]["active"] is False
    assert schedules[0]["schedule"]["cron"] == "0 3 * * 1"
    assert by_name["finetune/tiny-cpu"]["parameters"] == {"profile": "tiny-cpu", "overrides": []}
    pools = {p["name"]: p for p in cluster.api("POST", "/work_pools/filter", {})}
    gpu = pools["gpu-h100"]["base_job_template"]["variables"]["properties"]
    assert {"gpu_count", "node_selector", "tolerations", "store_pvc", "hf_token_secret"} <= set(gpu)


TINY = {"overrides": ["train.max_steps=4"], "until": "train"}


def test_tiny_cpu_runs_through_server_and_worker_with_train_in_the_gpu_pool(cluster: LocalPrefect) -> None:
    # FINETUNE_GPU_DISPATCH=always: the embedded default's two pools are one, so force the GPU-stage path.
    run, seconds = cluster.run_deployment("finetune/tiny-cpu", TINY, env={"FINETUNE_GPU_DISPATCH": "always"})
    assert run["state"]["type"] == "COMPLETED"
    assert run["name"].startswith("tiny-cpu-data-")  # profile and data version
    (stage_run,) = cluster.children(run["id"], "finetune-stage")
    assert stage_run["state"]["type"] == "COMPLETED" and stage_run["parameters"]["stage"] == "train"
    assert stage_run["work_queue_name"] and stage_run["deployment_id"]
    # The UI API shows states, logs and artifacts of both runs.
    history = cluster.api("GET", f"/flow_runs/{run['id']}/graph-v2")
    assert history["nodes"]
    logs = cluster.api("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [stage_run["id"]]}}, "limit": 200})
    assert any("launching 1 trainer process" in log["message"] for log in logs)
    keys = {a["key"] for a in cluster.api("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {
        "any_": [run["id"], stage_run["id"]]}}}) if a["key"]}
    assert {"resolved-profile", "lineage", "train-train-metrics"} <= keys
    # A rerun (what a schedule tick does) is all cache hits and submits nothing to the GPU pool.
    again, cached_seconds = cluster.run_deployment("finetune/tiny-cpu", TINY, env={"FINETUNE_GPU_DISPATCH": "always"})
    assert not cluster.children(again["id"])
    tasks = cluster.api("POST", "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [again["id"]]}}})
    stages = [t for t in tasks if t["name"].split("-")[0] in ("download", "pack", "train")]
    assert len(stages) == 3 and all(t["state"]["name"] == "Cached" for t in stages)
    print(f"\ntiny-cpu until=train via deployment: {seconds:.1f}s, cached rerun {cached_seconds:.1f}s")


def test_an_interval_schedule_fires_and_a_worker_completes_the_auto_scheduled_run(cluster: LocalPrefect) -> None:
    """The server's own scheduler (no `deployment run`) creates the run of finetune/tiny-cpu, as a schedule from
    prefect.yaml would; with SQLAlchemy 2.1 it failed on every loop and no run ever appeared."""
    (deployment,) = [d for d in cluster.api("POST", "/deployments/filter", {"deployments": {"name": {"any_": [
        "tiny-cpu"]}}})]
    # Anchored 5 s ahead: the first tick is then, not at the next whole minute; the second comes after the test.
    anchor = (datetime.now(timezone.utc) + timedelta(seconds=5)).isoformat()
    (schedule,) = cluster.api("POST", f"/deployments/{deployment['id']}/schedules", [
        {"schedule": {"interval": 60, "anchor_date": anchor}, "active": True, "parameters": TINY}])
    started = time.monotonic()
    try:
        def scheduled() -> list[dict[str, Any]]:
            return cluster.api("POST", "/flow_runs/filter", {"flow_runs": {
                "deployment_id": {"any_": [deployment["id"]]}, "tags": {"all_": ["auto-scheduled"]}}})

        first = _wait(scheduled, 90, "the scheduler to create a run")[0]
        created = time.monotonic() - started
        run = _final(cluster, first["id"], 240 - created)
    finally:
        cluster.api("DELETE", f"/deployments/{deployment['id']}/schedules/{schedule['id']}")
    assert run["state"]["type"] == "COMPLETED", (run["state"], cluster.logs("server")[-3000:])
    assert run["parameters"]["until"] == "train" and "auto-scheduled" in run["tags"]
    print(f"\nschedule: run created {created:.1f} s after the schedule, completed {time.monotonic() - started:.1f} s "
          "after it")


def test_a_production_deployment_run_without_its_data_is_refused(cluster: LocalPrefect) -> None:
    proc = cluster.prefect("deployment", "run", "finetune/maverick-lora", check=False)
    said = " ".join((proc.stdout + proc.stderr).split())  # the CLI wraps lines at the terminal's width
    assert proc.returncode != 0 and "Validation failed. Failure reason: 'data_source' is a required property" in said, said


def test_a_gpu_pool_without_a_ready_worker_fails_the_run_in_seconds_before_any_download(cluster: LocalPrefect) -> None:
    params = {"overrides": [*TINY["overrides"], "deploy.gpu_work_pool=gpu-h200"], "until": "train"}
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="finetune/tiny-cpu ended Failed") as failed:
        cluster.run_deployment("finetune/tiny-cpu", params, env={"FINETUNE_GPU_DISPATCH": "always"})
    seconds = time.monotonic() - started
    assert ("work pool gpu-h200 has no ready worker: start a worker for it (`prefect worker start --pool gpu-h200`"
            in str(failed.value)), str(failed.value)[:3000]
    (run,) = cluster.api("POST", "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
    # From the run's start (the worker's process, Prefect's and the plan's imports) to its failure; the CLI's wall
    # time adds the worker's pickup and the process start, ~70 s on a loaded 2-core machine.
    ran = (datetime.fromisoformat(run["end_time"]) - datetime.fromisoformat(run["start_time"])).total_seconds()
    assert ran < 60, ran
    tasks = cluster.api("POST", "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [run["id"]]}}})
    assert [t["name"].split("-")[0] for t in tasks] == ["preflight"], [t["name"] for t in tasks]  # no download
    print(f"\nno worker in the GPU pool: the run failed {ran:.1f} s after it started, {seconds:.1f} s after "
          "`deployment run`")


# Two-node training as two node runs in the GPU pool (one rendezvous endpoint, each node renewing the stage's lease,
# world size 16) runs at 2 x 8 processes in `finetune rehearse --profile maverick-lora` (tests/test_rehearse.py).


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_a_failed_node_fails_the_stage_and_cancels_the_other_node(cluster: LocalPrefect) -> None:
    params = {"overrides": ["train.epochs=50", "train.nnodes=2", "train.launcher=prefect-pool", "retries.count=0",
                            "retries.lock_lease_s=600"],  # see _train_and_preempt
              "until": "train"}
    proc = cluster.prefect("deployment", "run", "finetune/tiny-cpu", "--params", json.dumps(params))
    run_id = next(line.split()[-1] for line in proc.stdout.splitlines() if "UUID:" in line)

    def both_training() -> list[dict[str, Any]] | None:
        nodes = cluster.children(run_id, "finetune-train-node")
        ids = [n["id"] for n in nodes]
        logs = cluster.api("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": ids}}, "limit": 200}) if ids else []
        joined = {log["flow_run_id"] for log in logs if "trainer process" in log["message"]}
        return nodes if len(nodes) == 2 and len(joined) == 2 else None

    nodes = sorted(_wait(both_training, 240, "both node runs to start their trainers"),
                   key=lambda n: n["parameters"]["node_rank"])
    # Node 1 goes away (as a preempted node whose run is cancelled would).
    cluster.api("POST", f"/flow_runs/{nodes[1]['id']}/set_state",
                {"state": {"type": "CANCELLING", "message": "test: node lost"}, "force": True})
    parent = _wait(lambda: (r := cluster.api("GET", f"/flow_runs/{run_id}"))["state"]["type"] in
                   ("FAILED", "COMPLETED", "CRASHED") and r, 180, "the pipeline run to end")
    assert parent["state"]["type"] == "FAILED"
    node0 = _wait(lambda: (r := cluster.api("GET", f"/flow_runs/{nodes[0]['id']}"))["state"]["type"] ==
                  "CANCELLED" and r, 120, "node 0 to be cancelled")
    assert node0["state"]["type"] == "CANCELLED"
    logs = cluster.api("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    assert any("node 1 of 2" in log["message"] for log in logs)
    # No trainer of that run survives its cancelled flow run.
    _wait_trainers_gone(Path(nodes[0]["parameters"]["workdir"]))


def _wait_trainers_gone(workdir: Path, timeout_s: float = 60) -> None:
    """No process of this training (agent, worker or the trampoline starting them) may outlive its flow runs."""
    import psutil

    config = str(workdir / "torchtune_config.yaml")

    def survivors() -> list[str]:
        found = []
        for proc in psutil.process_iter(["pid", "ppid", "cmdline", "create_time", "status"]):
            if config in " ".join(proc.info["cmdline"] or []) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                age = time.time() - proc.info["create_time"]
                found.append(f"pid {proc.info['pid']} (parent {proc.info['ppid']}, {age:.0f} s old): "
                             f"{' '.join(proc.info['cmdline'])[:160]}")
        return found

    deadline = time.monotonic() + timeout_s
    while (left := survivors()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, "trainer processes outlived their flow runs:\n" + "\n".join(left)


EVERY = 10  # checkpoint interval of the preemption tests


def _train_and_preempt(cluster: LocalPrefect, lost_rank: int, max_steps: int, retries: int,
                       ) -> tuple[str, list[dict[str, Any]], Path, int]:
    """Start a 2-node tiny training through the pool and, once past its first checkpoint, SIGTERM the
    `prefect flow-run execute` process of node ``lost_rank`` (what kubelet does when a spot node is reclaimed)."""
    params = {"overrides": [f"train.max_steps={max_steps}", f"train.checkpoint_every_steps={EVERY}", "train.nnodes=2",
                            "train.launcher=prefect-pool",
                            "train.elastic={min_nodes: 2, max_nodes: 2, max_restarts: 3}", f"retries.count={retries}",
                            # As a rehearsal's (flows/rehearse.py): while two nodes' trainers start on 2 cores, the
                            # loopback server's SQLite stalled the stage's lease renewal past half of a 120 s lease
                            # (seen in CI), and the stage then stopped on its lease instead of on the lost node.
                            "retries.lock_lease_s=600",
                            # Node runs under the supervisor the Kubernetes GPU pools use, which reschedules on SIGTERM.
                            "deploy.job_variables={command: prefect flow-run execute, "
                            "env: {PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR: reschedule}}"],
              "until": "train"}
    proc = cluster.prefect("deployment", "run", "finetune/tiny-cpu", "--params", json.dumps(params))
    run_id = next(line.split()[-1] for line in proc.stdout.splitlines() if "UUID:" in line)

    def past_first_checkpoint() -> list[dict[str, Any]] | None:
        nodes = cluster.children(run_id, "finetune-train-node")
        if len(nodes) != 2:
            return None
        workdir = Path(nodes[0]["parameters"]["workdir"])
        past = (workdir / "checkpoints" / f"step_{EVERY}").is_dir() and last_logged_step(workdir) > EVERY
        return nodes if past else None

    nodes = sorted(_wait(past_first_checkpoint, 300, "training past its first checkpoint on both nodes"),
                   key=lambda n: n["parameters"]["node_rank"])
    workdir = Path(nodes[0]["parameters"]["workdir"])
    supervisor = flow_run_process(nodes[lost_rank]["id"])
    assert supervisor is not None, f"node {lost_rank} does not run under `prefect flow-run execute`"
    killed_at = last_logged_step(workdir)
    supervisor.send_signal(signal.SIGTERM)
    parent = _wait(lambda: (r := cluster.api("GET", f"/flow_runs/{run_id}"))["state"]["type"] in
                   ("FAILED", "COMPLETED", "CRASHED", "CANCELLED") and r, 600, "the pipeline run to end")
    assert parent["state"]["type"] == "COMPLETED", parent["state"].get("message")
    return run_id, nodes, workdir, killed_at


def _states(cluster: LocalPrefect, run_id: str) -> list[str]:
    return [s["name"] for s in cluster.api("GET", f"/flow_run_states/?flow_run_id={run_id}")]


def _check_resumed_training(cluster: LocalPrefect, node0_id: str, workdir: Path, killed_at: int, max_steps: int) -> int:
    """Training went on from the newest checkpoint before the loss (not from scratch) and finished; no trainer is
    left. Returns the step it resumed from."""
    resumed = [int(m.split("(step ")[1].split(",")[0]) for m in (log["message"] for log in cluster.run_logs([node0_id]))
               if "[sft] resumed from" in m]
    # The preempted trainer finishes its step and saves on notice (issue 16), so the resume point may be just past the
    # step the SIGTERM was seen at; without a notice save it is the last periodic checkpoint.
    assert resumed and EVERY <= resumed[-1] <= killed_at + 2 and killed_at - resumed[-1] <= EVERY + 1, (resumed, killed_at)
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, max_steps + 1))  # one contiguous log: redone steps replace their first try
    artifact = json.loads((workdir / "artifact.json").read_text())
    assert artifact["metrics"]["world_size"] == 2 and artifact["metrics"]["steps"] == max_steps
    _wait_trainers_gone(workdir)
    return resumed[-1]


# A preempted node that is not the rendezvous host (rescheduled, rejoins, training resumes from its notice save) is
# drilled at 2 x 8 processes by `finetune rehearse --profile maverick-lora` (tests/test_rehearse.py).


def test_a_preempted_rendezvous_host_retries_the_stage_which_resumes_from_its_checkpoint(cluster: LocalPrefect) -> None:
    run_id, nodes, workdir, killed_at = _train_and_preempt(cluster, lost_rank=0, max_steps=110, retries=1)
    # Node 0 hosted the rendezvous store: node 1 failed with it, the coordinator cancelled node 0's rescheduled run
    # (which must not come back to life) and the stage's retry started two new node runs.
    node_runs = cluster.children(run_id, "finetune-train-node")
    assert len(node_runs) == 4
    first = {n["id"] for n in nodes}
    retried = sorted((n for n in node_runs if n["id"] not in first), key=lambda n: n["parameters"]["node_rank"])
    assert all(n["state"]["type"] == "COMPLETED" for n in retried)
    assert _states(cluster, nodes[0]["id"])[-1] == "Cancelled", _states(cluster, nodes[0]["id"])
    logs = cluster.run_logs([run_id])
    assert any("NodeFailed" in log["message"] for log in logs)
    resumed = _check_resumed_training(cluster, retried[0]["id"], workdir, killed_at, 110)
    print(f"\npreempted node 0 at step {killed_at}: stage retried, resumed from step {resumed}")


def test_the_kubernetes_worker_renders_a_gpu_node_run_into_a_valid_job(cluster: LocalPrefect) -> None:
    """What prefect-kubernetes' worker submits for a maverick-lora node run in its GPU pool (gpu-h200), built by the worker's own
    code from the pool created by create-pools.sh, the deployed node deployment and the job variables the train
    stage passes; the Job's spec is checked against Kubernetes' JobSpec schema (from the JobSet CRD, strict)."""
    import asyncio

    from prefect.client.orchestration import PrefectClient

    from finetune.profile import load_profile
    from flows.k8s_jobs import job_problems, render_job

    profile = load_profile("maverick-lora")

    async def resolve() -> tuple[dict[str, Any], str]:
        async with PrefectClient(api=cluster.api_url) as client:
            deployment = await client.read_deployment_by_name(f"finetune-train-node/{profile.deploy.gpu_work_pool}")
            run = await client.create_flow_run_from_deployment(
                deployment.id, parameters={"profile": profile.name, "overrides": [], "workdir": "/store/train/k",
                                           "node_rank": 1, "rendezvous": "r"},
                job_variables=profile.gpu_job_variables)
            try:
                pool = await client.read_work_pool(profile.deploy.gpu_work_pool)
                job = await render_job(client, run.id, profile.gpu_job_variables, pool.base_job_template)
            finally:
                await client.delete_flow_run(run.id)  # no Kubernetes worker will ever pick it up
            return job, str(run.id)

    job, run_id = asyncio.run(resolve())
    assert job_problems(job) == []
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["prefect", "flow-run", "execute"] or \
        container.get("command") == ["prefect", "flow-run", "execute"], container
    assert container["resources"]["limits"]["nvidia.com/gpu"] == profile.train.nproc_per_node
    assert pod["nodeSelector"] == profile.deploy.job_variables["node_selector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] and "value" not in env["HF_TOKEN"]
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"]["value"] == "reschedule"
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == run_id
    assert container["image"]


LEASE_S = 60  # retries.lock_lease_s: the shortest lease the server accepts
ONE_KEY = {"overrides": ["train.max_steps=40", f"train.checkpoint_every_steps={EVERY}", "data.max_seq_len=64",
                         "train.batch_size=2", f"retries.lock_lease_s={LEASE_S}"], "until": "train"}


def _start_run(cluster: LocalPrefect, params: dict[str, Any]) -> str:
    proc = cluster.prefect("deployment", "run", "finetune/tiny-cpu", "--params", json.dumps(params))
    return next(line.split()[-1] for line in proc.stdout.splitlines() if "UUID:" in line)


def _final(cluster: LocalPrefect, run_id: str, timeout_s: float = 600) -> dict[str, Any]:
    return _wait(lambda: (run := cluster.api("GET", f"/flow_runs/{run_id}"))["state"]["type"] in (
        "COMPLETED", "FAILED", "CRASHED", "CANCELLED") and run, timeout_s, f"flow run {run_id} to finish")


def _messages(cluster: LocalPrefect, run_id: str) -> list[str]:
    return [log["message"] for log in cluster.run_logs([run_id])]


def _train_result(cluster: LocalPrefect, run_id: str) -> dict[str, Any]:
    tasks = cluster.api("POST", "/task_runs/filter", {"task_runs": {"flow_run_id": {"any_": [run_id]}}})
    (train,) = [t for t in tasks if t["name"].startswith("train-")]
    return train


def test_two_deployment_runs_on_two_workers_compute_each_stage_once(cluster: LocalPrefect) -> None:
    first = _start_run(cluster, ONE_KEY)
    time.sleep(3)
    second = _start_run(cluster, ONE_KEY)
    runs = [_final(cluster, run_id) for run_id in (first, second)]
    assert [r["state"]["type"] for r in runs] == ["COMPLETED", "COMPLETED"], [r["state"] for r in runs]
    logs = {run_id: _messages(cluster, run_id) for run_id in (first, second)}
    launches = sum("trainer process(es)" in m for messages in logs.values() for m in messages)
    assert launches == 1, launches
    waiting = [m for messages in logs.values() for m in messages if "is computing this stage; waiting" in m]
    assert waiting and "flow run " in waiting[0], waiting  # names the run it waits for
    print(f"\ntwo deployment runs of one key: {[m for ms in logs.values() for m in ms if 'waited for is done' in m]}")


def test_kill_9_of_the_computing_flow_run_hands_train_to_the_other_worker(cluster: LocalPrefect) -> None:
    """A lost machine: every process of the flow run computing train (its trainer included) killed with SIGKILL."""
    import re

    import psutil

    steps = 100  # long enough that the second run is waiting when the first is killed
    params = {**ONE_KEY, "overrides": [*ONE_KEY["overrides"], f"train.max_steps={steps}"]}  # a key of its own
    run_ids = [_start_run(cluster, params)]
    time.sleep(3)
    run_ids.append(_start_run(cluster, params))

    def waiting_for_train() -> str | None:
        return next((run_id for run_id in run_ids if any(re.search(r"\btrain [0-9a-f]{12}: .* waiting for it", m)
                                                         for m in _messages(cluster, run_id))), None)

    try:
        taker = _wait(waiting_for_train, 600, "one run to wait for the other's train stage")
    except AssertionError as exc:  # say what the runs did instead
        runs = {run_id: cluster.api("GET", f"/flow_runs/{run_id}")["state"] for run_id in run_ids}
        raise AssertionError(f"{exc}; states {runs}; last messages "
                             f"{ {run_id: _messages(cluster, run_id)[-15:] for run_id in run_ids} }") from None
    holder = next(run_id for run_id in run_ids if run_id != taker)
    store = Path(cluster.env["FINETUNE_STORE"])
    workdir = _wait(lambda: next((m.parent for m in (store / "train").glob("*/metrics.jsonl")
                                  if f"max_steps: {steps}" in (m.parent / "torchtune_config.yaml").read_text()
                                  and last_logged_step(m.parent) >= EVERY + 3), None),
                    300, "the holder past a checkpoint")
    killed_at = last_logged_step(workdir)
    for process in psutil.process_iter():
        try:
            if process.environ().get("PREFECT__FLOW_RUN_ID") == holder:
                process.kill()
        except psutil.Error:
            continue
    killed, killed_at_wall = time.monotonic(), time.time()
    run = _final(cluster, taker)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    artifact = json.loads((workdir / "artifact.json").read_text())
    resumed = artifact["metrics"]["resumed_from_step"]
    assert resumed is not None and killed_at - EVERY <= resumed <= killed_at + 2, (killed_at, resumed)
    recorded = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert recorded == list(range(1, steps + 1))
    # The taker's wait ends as soon as it finds no process holding the store's lock: it releases the killed run's
    # server lease instead of waiting a lease for it (finetune/stage_lock.py). Its train stage then says it waited.
    taker_logs = cluster.run_logs([taker])
    took = next((log for log in taker_logs if datetime.fromisoformat(log["timestamp"]).timestamp() > killed_at_wall
                 and re.search(r"\btrain [0-9a-f]{12}: (the run we waited for is done|computing under)", log["message"])),
                None)
    trail = [f"{log['timestamp']} {log['message'][:200]}" for log in taker_logs
             if re.search(r"\btrain\b|[Rr]etry|lease|[Ee]rror", log["message"])]
    assert took is not None, trail
    takeover_s = datetime.fromisoformat(took["timestamp"]).timestamp() - killed_at_wall
    assert any("died holding" in log["message"] and "released its server lease" in log["message"]
               for log in taker_logs), trail
    assert takeover_s < LEASE_S / 2, (takeover_s, trail)  # polled every second; a lease would be LEASE_S
    print(f"\nkill -9 at step {killed_at}: taken over {takeover_s:.1f} s after the kill (lease {LEASE_S} s; "
          f"{took['message']}); resumed from {resumed} ({max(0, killed_at - resumed)} steps lost), taker finished "
          f"{time.monotonic() - killed:.1f} s after the kill")


def test_a_lost_worker_s_run_is_marked_crashed_rescheduled_and_resumes_on_a_new_worker(cluster: LocalPrefect) -> None:
    """The worker and every process it started frozen with SIGSTOP mid-training, as when its machine hangs or its
    container is paused: nobody reports the run, its heartbeats stop, the finetune-lost-worker automation
    (deployments/automations.yaml, installed by create-pools.sh) marks it Crashed, finetune-reschedule-crashed
    reschedules it, a new worker takes it, takes the stage key once the frozen run's server lease expired, kills the
    frozen processes that still hold the store's lock (finetune/stage_lock.py), and training resumes from the
    checkpoint. No person acts. (A frozen run is the harder case of a lost one: killed, its processes free the lock
    by dying; kill -9 of every process of a run: test_kill_9_of_the_computing_flow_run_hands_train_to_the_other_worker.)
    """
    import psutil

    steps = 60  # a key of its own
    run_id = _start_run(cluster, {**ONE_KEY, "overrides": [*ONE_KEY["overrides"], f"train.max_steps={steps}"]})
    store = Path(cluster.env["FINETUNE_STORE"])
    workdir = _wait(lambda: next((m.parent for m in (store / "train").glob("*/metrics.jsonl")
                                  if f"max_steps: {steps}" in (m.parent / "torchtune_config.yaml").read_text()
                                  and last_logged_step(m.parent) >= EVERY + 3), None),
                    400, "training past a checkpoint")
    engine = next(p for p in psutil.process_iter() if _env_of(p).get("PREFECT__FLOW_RUN_ID") == run_id)
    workers = {proc.pid: name for name, proc in cluster.procs.items() if name.startswith("worker")}
    (lost,) = [workers[p.pid] for p in engine.parents() if p.pid in workers]
    killed_at = last_logged_step(workdir)
    # The machine hangs: the worker's session and every process of the run (its engine has a session of its own).
    frozen = [p for p in psutil.process_iter() if _env_of(p).get("PREFECT__FLOW_RUN_ID") == run_id]
    os.killpg(cluster.procs[lost].pid, signal.SIGSTOP)
    for process in frozen:
        process.suspend()
    killed = time.monotonic()
    try:
        cluster.start("worker-3", "worker", "start", "--pool", "local-process", "--type", "process", "--name",
                      "worker-3")
        # Crashed is not the end here: the automation reschedules it.
        run = _wait(lambda: (r := cluster.api("GET", f"/flow_runs/{run_id}"))["state"]["type"] in ("COMPLETED",
                                                                                                   "FAILED") and r,
                    600, "the lost run to come back and finish")
    finally:
        os.killpg(cluster.procs[lost].pid, signal.SIGKILL)  # the frozen worker, which nothing else stops
        for process in frozen:
            with contextlib.suppress(psutil.Error):
                process.kill()
    states = cluster.api("GET", f"/flow_run_states/?flow_run_id={run_id}")
    assert run["state"]["type"] == "COMPLETED", (run["state"], [(s["name"], s["message"]) for s in states])
    crashed = [s for s in states if s["type"] == "CRASHED"]
    assert crashed and crashed[0]["message"].startswith("worker lost: no heartbeat"), crashed
    resumed = json.loads((workdir / "artifact.json").read_text())["metrics"]["resumed_from_step"]
    assert resumed is not None and killed_at - EVERY <= resumed <= killed_at + 2, (killed_at, resumed)
    fenced = [m for m in _messages(cluster, run_id) if "lost its server lease and is frozen" in m]
    assert fenced, "the frozen run's processes were not killed by the run that took its stage over"
    print(f"\nworker {lost} frozen at step {killed_at}: Crashed {_since(crashed[0], killed):.1f} s after, "
          f"completed {time.monotonic() - killed:.1f} s after it, resumed from step {resumed}; {fenced[0]}")


def _env_of(process) -> dict[str, str]:
    import psutil

    try:
        return process.environ()
    except psutil.Error:
        return {}


def _since(state: dict[str, Any], monotonic_then: float) -> float:
    """Seconds from a monotonic instant to a state's timestamp."""
    wall_then = time.time() - (time.monotonic() - monotonic_then)
    return datetime.fromisoformat(state["timestamp"]).timestamp() - wall_then

