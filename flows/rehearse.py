"""`finetune rehearse`: a production profile as written, run on this machine's CPUs before any GPU is rented.

`finetune plan` says whether a run fits; a rehearsal says whether it goes through. The profile runs through a real
Prefect server with the deployments of prefect.yaml, its GPU pools stood in by process workers under the same names
(so dispatch, node runs and their job variables are the profile's), and only what cannot run here changes, each change
listed in the report (``shrunk``): the model (the embedded tiny model in the profile's family shape: Scout's 16 experts
in every layer, Maverick's 128 in every second one), the data (the first records of the profile's own sources when
this machine can read them, else the embedded set: flows/rehearsal_data.py), the devices, the sizes of evaluation,
quantization and benchmark that are the real model's, the number of steps and the checkpoint interval. Kept as
written: pools and dispatch, launcher, nodes x processes, expert parallelism, method, final format, evaluate and
benchmark weights and engines, quantize, publish (to a local directory), the preflight. The Kubernetes Job each GPU flow
run would become is rendered by prefect-kubernetes' own code and validated (flows/k8s_jobs.py).

Two drills during training, each ending with the run completed by itself: the spot notice as the profile's platform
delivers it (SIGTERM to PID 1 of the trainer's container, which is `prefect flow-run execute`; or the cloud's
metadata notice for train.spot_notice aws/gcp/azure), and the worker that started the trainer's run killed (kill -9;
a Kubernetes Job, like this process pool's flow run, outlives its worker, and a new worker takes the pool over).
"""

from __future__ import annotations

import json
import re
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from finetune.preflight.data import placeholders
from finetune.profile import REPO_ROOT, Profile, load_profile
from flows.cloud_metadata import SERVERS, MetadataServer
from flows.local_cluster import LocalPrefect, start_cluster
from flows.rehearsal_data import DataSample, sample_sources
from tunerecipes.checkpoint_layout import CHECKPOINT_LOG, METRICS_FILE, last_logged_step, read_records
from tunerecipes.ep_degree import ROUTED_EXPERTS

T = TypeVar("T")

STEPS = 30
"""Optimizer steps of a rehearsal: room for the drills (a notice after a third, a lost worker two steps after the
resume), also where one tiny step takes a quarter of a second."""
CHECKPOINT_MINUTES = 0.02
"""The rehearsal's time-based checkpoint interval (1.2 s): two saves before the notice drill whether a step takes a
quarter of a second (one process) or seconds (16 processes)."""
REHEARSAL_LEASE_S = 600.0
"""Stage-key lease of a rehearsal (retries.lock_lease_s), see shrink()."""
EVALUATION_LIMIT = 20
BENCHMARK_PROMPTS = 8
TIME_SAVES_BEFORE_NOTICE = 2
LOCAL_IMAGE = "llama4-finetune"
"""What `docker build --target ROLE -t llama4-finetune:ROLE .` of this checkout names each role's image."""
EMBEDDED_DEFAULT = "tiny-cpu"
"""The profile whose sizes a rehearsal takes where the real model's would not run here."""
TIMEOUT_S = 1800.0
PIPELINE_CHECK_S = 10.0
WORKLOAD_NICENESS = 19
"""The workers and what they start (trainers, inference servers) run at the lowest priority, below the Prefect
server: on a cluster the control plane has machines of its own. Sharing this one's 2 cores at equal priority, 16
trainers and a vLLM starved SQLite's writes for a minute and the stage leases could not be renewed; at niceness 10
(17 such processes outweigh the server about 2 to 1) SQLite still answered "database is locked" for three minutes and
the notice drill landed after training had ended."""


class RehearsalFailed(RuntimeError):
    """The rehearsal did not go through; the message says where, and the report so far is attached."""

    def __init__(self, message: str, report: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.report = dict(report)


@dataclass(frozen=True)
class Change:
    """One field a rehearsal changes: the profile's value, the rehearsal's, and why it must change."""

    field: str
    as_written: Any
    rehearsed: Any
    why: str


def _get(data: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, Mapping) else None
    return data


DATA_SOURCE_FIELDS = ("data.source", "data.sources", "data.revision")
"""Where the data comes from: a rehearsal reads the first records of the user's choice, or the embedded set."""


def _data_rules(profile: Profile, small: Mapping[str, Any], data: DataSample | None) -> list[tuple[str, Any, str]]:
    """The first records of the profile's own sources (``data``, flows/rehearsal_data.py) or, when they cannot be
    read here, the embedded default's data in the profile's format family."""
    if data is not None and data.overrides:
        return [(name, value, data.why) for name, value in data.overrides.items()]
    why = "the shipped data of the embedded default" + (f": {data.why}" if data is not None else "")
    embedded = "embedded/preferences" if profile.train.method == "dpo" else small["data"]["source"]
    return [("data.source", embedded, why), ("data.sources", None, why), ("data.revision", None, why)]


def shrink(profile: Profile, publish_dir: Path, data: DataSample | None = None) -> list[Change]:
    """What a rehearsal of ``profile`` changes, field by field; everything else is run as written. ``data``: the
    first records of the profile's sources, when they could be read."""
    written = profile.model_dump(mode="json")
    small = load_profile(EMBEDDED_DEFAULT).model_dump(mode="json")
    experts = ROUTED_EXPERTS[profile.model.family]
    rules: list[tuple[str, Any, str]] = [
        ("model.source", "embedded", f"no hub here: the embedded tiny model built in the {profile.model.family} "
                                     f"shape ({experts} routed experts)"),
        *((f"model.{name}", small["model"][name], "the embedded model is local and text-only")
          for name in ("repo_id", "revision", "allow_patterns", "ignore_patterns", "multimodal")),
        *_data_rules(profile, small, data),
        ("data.max_seq_len", small["data"]["max_seq_len"], "the tiny model's context"),
        *((f"{section}.device", "cpu", "no GPU here") for section in ("train", "evaluate", "quantize")),
        ("train.max_steps", STEPS, "a rehearsal trains long enough for its drills"),
        ("train.gradient_accumulation_steps", 1, "one micro-batch per process and step: the drills need steps, "
                                                 "not tokens"),
        ("train.epochs", STEPS, f"passes enough over the small set for {STEPS} steps (max_steps ends it)"),
        ("train.recipe_overrides", {**profile.train.recipe_overrides, "num_threads": 1},
         "one thread per trainer: the trainers share this machine's cores"),
        *((f"evaluate.{name}", small["evaluate"][name], "the embedded default's tasks: the real benchmarks need "
                                                        "the real model and their datasets")
          for name in ("tasks", "include_path", "max_gen_toks", "batch_size")),
        ("evaluate.limit", EVALUATION_LIMIT, "documents per task: the scores of a random model prove the path, "
                                             "not the model"),
        ("evaluate.gate", {"max_drop": None, "require_rise": None, "dpo": None},
         f"a {STEPS}-step tune of a random model has no quality to gate: scores are reported, not gated"),
        *((f"quantize.{name}", small["quantize"][name], "the tiny model's sizes")
          for name in ("group_size", "calibration_samples", "calibration_seq_len")),
        *((f"benchmark.{name}", small["benchmark"][name], "the tiny model's sizes")
          for name in ("max_model_len", "max_tokens")),
        ("benchmark.num_prompts", BENCHMARK_PROMPTS, "prompts per level: the rehearsal proves the serving path"),
        ("deploy.image", None, "process stand-ins run this checkout, not the images"),
        *((f"deploy.images.{role}", f"{LOCAL_IMAGE}:{role}", "process stand-ins run this checkout: the images are "
                                                              "not pulled here (their names are checked: before_renting)")
          for role in profile.deploy.images),
        ("deploy.job_variables", {"command": "prefect flow-run execute",
                                  "env": {"PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "reschedule"}},
         "process stand-ins of the GPU pools: PID 1 of the pods and its SIGTERM behaviour, as the Kubernetes pools "
         "run it; the Job the written variables render is validated instead (report: kubernetes_jobs)"),
        ("publish.target", str(publish_dir), "published to a local directory, not the profile's target"),
    ]
    if profile.benchmark.tensor_parallel_size > 1:
        rules.append(("benchmark.tensor_parallel_size", 1, f"tensor parallel {profile.benchmark.tensor_parallel_size}"
                                                           " over the tiny model's 4 attention heads"))
    if profile.retries.lock_lease_s < REHEARSAL_LEASE_S:
        rules.append(("retries.lock_lease_s", REHEARSAL_LEASE_S, "the loopback server's SQLite stalls writes for up "
                      "to a minute while 16 trainers and a vLLM share 2 cores, and a stage that cannot renew its "
                      "lease for half of it stops its trainers (a cluster's server runs on Postgres, on its own "
                      "machine)"))
    if profile.train.async_checkpoint:
        rules.append(("train.async_checkpoint", False, "asynchronous saves overlap GPU work: no GPU here"))
    if profile.train.checkpoint_every_minutes is not None:
        rules.append(("train.checkpoint_every_minutes", CHECKPOINT_MINUTES,
                      "scaled so that at least two time-based checkpoints happen in the rehearsal"))
    return [Change(name, _get(written, name), value, why) for name, value, why in rules
            if _get(written, name) != value]


def change_overrides(changes: list[Change]) -> list[str]:
    """The changes as profile overrides (values in JSON, which the override parser reads as YAML)."""
    return [f"{change.field}={json.dumps(change.rehearsed)}" for change in changes]


def _deployment(profile: Profile) -> dict[str, Any]:
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        if deployment["name"] == profile.name and deployment["entrypoint"].startswith("flows.finetune:"):
            return deployment
    raise RehearsalFailed(f"prefect.yaml has no deployment finetune/{profile.name}: a rehearsal runs a profile's "
                          "deployment as users run it (add one beside the shipped profiles')", {})


def kubernetes_pools() -> set[str]:
    """The work pools deployments/create-pools.sh creates as Kubernetes pools (its `create NAME kubernetes ...`)."""
    script = (REPO_ROOT / "deployments" / "create-pools.sh").read_text()
    return set(re.findall(r"^\s*create (\S+) kubernetes ", script, re.MULTILINE))


def _stand_in_pools() -> list[str]:
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    return sorted({d["work_pool"]["name"] for d in config["deployments"] if d.get("work_pool")} - {"local-process"})


def stand_in_prefect_file(root: Path) -> tuple[Path, list[Change]]:
    """prefect.yaml with the GPU deployments' pull steps (into the image's checkout) replaced by the local ones (into
    this checkout), where the process stand-ins run them; every other line as written."""
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    changes = []
    for deployment in config["deployments"]:
        if "pull" in deployment and deployment["pull"] != config["pull"]:
            changes.append(Change(f"prefect.yaml {deployment['entrypoint']} {deployment['name']}: pull",
                                  deployment["pull"], config["pull"], "the stand-ins run this checkout, not the image's"))
            deployment["pull"] = config["pull"]
    path = root / "prefect.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, changes


def _wait(what: str, probe: Callable[[], T | None], timeout_s: float, cluster: LocalPrefect, pipeline: str) -> T:
    """Poll ``probe`` every half second; ask the server whether the pipeline ended only every PIPELINE_CHECK_S, as a
    request can take seconds while the loopback server is loaded and a drill must land at its step."""
    deadline = time.monotonic() + timeout_s
    checked = time.monotonic()
    while time.monotonic() < deadline:
        if (value := probe()) is not None:
            return value
        if time.monotonic() - checked >= PIPELINE_CHECK_S:
            run = cluster.api("GET", f"/flow_runs/{pipeline}")
            checked = time.monotonic()
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                hint = " (training too short for the drills: raise train.max_steps)" \
                    if run["state"]["type"] == "COMPLETED" else ""
                raise RuntimeError(f"the pipeline run ended {run['state']['name']} while waiting for {what}{hint}: "
                                   f"{run['state'].get('message')}")
        time.sleep(0.5)
    raise TimeoutError(f"no {what} after {timeout_s:.0f} s")


def _flow_runs(cluster: LocalPrefect) -> list[dict[str, Any]]:
    flows = {f["id"]: f["name"] for f in cluster.api("POST", "/flows/filter", {})}
    runs = cluster.api("POST", "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC", "limit": 200})
    return [{**run, "flow_name": flows[run["flow_id"]]} for run in runs]


def _trainer_run(cluster: LocalPrefect, profile: Profile, node_rank: int = 0) -> dict[str, Any] | None:
    """The running flow run whose process is the trainer's container's PID 1: that node's run (prefect-pool
    launcher), else the train stage's run."""
    for run in _flow_runs(cluster):
        if run["state"]["type"] != "RUNNING":
            continue
        if profile.train.launcher == "prefect-pool":
            if run["flow_name"] == "finetune-train-node" and run["parameters"].get("node_rank") == node_rank:
                return run
        elif run["flow_name"] == "finetune-stage" and run["parameters"].get("stage") == "train":
            return run
    return None


def flow_run_process(flow_run_id: str) -> Any:
    """The `prefect flow-run execute` process of a flow run: what a pod runs as PID 1, and what kubelet SIGTERMs on
    a spot reclaim."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        try:
            if "flow-run" in (process.info["cmdline"] or []) and \
                    process.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                return process
        except psutil.Error:
            continue
    return None


@dataclass
class Drill:
    """One drill; step_at_notice is the step the trainers acted at (their notice save's), step_at_delivery the
    last step finished when the notice was delivered (a polled notice is seen up to a poll interval later)."""

    kind: str
    step_at_delivery: int
    step_at_notice: int | None = None
    resumed_from_step: int | None = None
    steps_lost: int | None = None
    recovered: bool = False
    detail: str = ""


class Rehearsal:
    """One rehearsal: its cluster, the pipeline's flow run, the store, the drills."""

    def __init__(self, cluster: LocalPrefect, profile: Profile, pipeline: str, store: Path, log: Callable[[str], None],
                 metadata: MetadataServer | None = None):
        self.cluster, self.profile, self.pipeline, self.store, self.log = cluster, profile, pipeline, store, log
        self.metadata = metadata
        self.drills: list[Drill] = []
        self.peak_rss_gib: float = 0.0
        self.resumes_before_kill = 0

    def _workdir(self) -> Path | None:
        found = sorted((self.store / "train").glob(f"*/{METRICS_FILE}")) if (self.store / "train").is_dir() else []
        return found[0].parent if found else None

    def _last_step(self) -> int:
        workdir = self._workdir()
        return last_logged_step(workdir) if workdir else 0

    def _wait(self, what: str, probe: Callable[[], T | None], timeout_s: float = TIMEOUT_S) -> T:
        return _wait(what, probe, timeout_s, self.cluster, self.pipeline)

    def _sample_trainers(self) -> None:
        """Peak RSS of any one trainer process (the recipe's processes, found by their command line)."""
        import psutil

        for process in psutil.process_iter(["cmdline", "memory_info"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if "tunerecipes" in cmdline and process.info["memory_info"] is not None:
                self.peak_rss_gib = max(self.peak_rss_gib, process.info["memory_info"].rss / 2**30)

    def _at_step(self, step: int) -> int:
        """The step the trainers' metrics file records once it reaches ``step``: read from the store, not the server,
        so that a drill lands at its step however slowly the server answers."""
        def reached() -> int | None:
            self._sample_trainers()
            last = self._last_step()
            return last if last >= step else None

        return self._wait(f"training at step {step}", reached)

    def _running_trainer_run(self, node_rank: int = 0) -> dict[str, Any]:
        """The trainer's flow run once it runs (its id outlives a reschedule), resolved before a drill waits for its
        step."""
        return self._wait(f"node {node_rank}'s trainer flow run to run",
                          lambda: _trainer_run(self.cluster, self.profile, node_rank=node_rank))

    @staticmethod
    def _supervisor(run: dict[str, Any]) -> Any:
        process = flow_run_process(run["id"])
        if process is None:
            raise RuntimeError(f"no `prefect flow-run execute` process for flow run {run['name']}")
        return process

    def notice_drill(self) -> Drill:
        """The platform's spot notice to the last node's trainer container (of N nodes, N-1 reclaims in N are not
        the rendezvous host's), after two time-based checkpoints where the profile saves by time."""
        def saved_on_time() -> bool | None:
            workdir = self._workdir()
            saves = [r for r in read_records(workdir / CHECKPOINT_LOG) if r["reason"] == "minutes"] if workdir else []
            return True if len(saves) >= TIME_SAVES_BEFORE_NOTICE else None

        run = self._running_trainer_run(node_rank=self.profile.train.nnodes - 1)
        if self.profile.train.checkpoint_every_minutes is not None:
            self._wait(f"{TIME_SAVES_BEFORE_NOTICE} time-based checkpoints", saved_on_time)
        step = self._at_step(STEPS // 3)
        if self.metadata is not None:
            self.metadata.notify()
            drill = Drill(f"spot notice: the {self.metadata.cloud} instance metadata's notice", step_at_delivery=step,
                          detail=f"polled by the trainers from {self.metadata.url}")
        else:
            self._supervisor(run).send_signal(signal.SIGTERM)
            drill = Drill("spot notice: SIGTERM to PID 1 (prefect flow-run execute) of the trainer's container",
                          step_at_delivery=step, detail=f"flow run {run['name']}")
        self.log(f"drill: {drill.kind} at step {step} ({run['name']})")
        workdir = self._workdir()
        assert workdir is not None
        notice = self._wait("the notice checkpoint", lambda: next(
            (r for r in read_records(workdir / CHECKPOINT_LOG) if r["reason"] == "notice"), None))
        drill.step_at_notice = notice["step"]
        if self.metadata is not None:
            self.metadata.clear()  # the machine that takes over has no notice
        resumed = self._wait("training to resume", lambda: self._resumed_steps() or None)
        drill.resumed_from_step = resumed[-1]
        drill.steps_lost = max(0, drill.step_at_notice - drill.resumed_from_step)
        self._at_step(drill.resumed_from_step + 1)
        drill.recovered = True
        self.drills.append(drill)
        return drill

    def _resumed_steps(self) -> list[int]:
        runs = [r["id"] for r in _flow_runs(self.cluster)]
        return [int(m.group(1)) for log in self.cluster.run_logs(runs)
                if (m := re.search(r"\] resumed from .*\(step (\d+),", log["message"]))]

    def worker_drill(self) -> Drill:
        """kill -9 of the worker that started the trainer's flow run, two steps after the notice drill's resume; a
        replacement worker joins the pool."""
        resumed = self.drills[-1].resumed_from_step if self.drills else None
        run = self._running_trainer_run()
        step = self._at_step((resumed or STEPS // 3) + 2)
        process = self._supervisor(run)
        workers = {proc.pid: name for name, proc in self.cluster.procs.items() if name.startswith("worker")}
        owner = next((workers[p.pid] for p in process.parents() if p.pid in workers), None)
        if owner is None:
            raise RuntimeError(f"no worker of this rehearsal started flow run {run['name']}")
        pool = run["work_pool_name"]
        self.resumes_before_kill = len(self._resumed_steps())
        self.cluster.procs[owner].send_signal(signal.SIGKILL)
        self.cluster.procs[owner].wait()
        self.log(f"drill: kill -9 of {owner} (pool {pool}) at step {step}")
        replacement = f"{owner}-replacement"
        self.cluster.start_worker(replacement, pool, WORKLOAD_NICENESS)
        drill = Drill(f"worker killed: kill -9 of {owner}, which started {run['name']}; {replacement} started",
                      step_at_delivery=step, step_at_notice=step, detail=f"pool {pool}")
        self.drills.append(drill)
        return drill

    def finish(self) -> dict[str, Any]:
        """Wait for the pipeline run to end (sampling the trainers' memory); the worker drill recovered when the run
        completed (steps lost: those redone by a resume after the kill, if any)."""

        def ended() -> dict[str, Any] | None:
            self._sample_trainers()
            run = self.cluster.api("GET", f"/flow_runs/{self.pipeline}")
            return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        deadline = time.monotonic() + TIMEOUT_S
        while (run := ended()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pipeline run did not end within {TIMEOUT_S:.0f} s")
            time.sleep(1)
        resumes = self._resumed_steps()
        for drill in self.drills:
            if drill.kind.startswith("worker killed"):
                drill.resumed_from_step = resumes[-1] if len(resumes) > self.resumes_before_kill else None
                drill.steps_lost = 0 if drill.resumed_from_step is None else \
                    max(0, drill.step_at_delivery - drill.resumed_from_step)
                drill.recovered = run["state"]["type"] == "COMPLETED"
        return run


def rehearse(profile_name: str, overrides: list[str], store: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Rehearse a profile (see the module's docstring); returns the report. Raises RehearsalFailed with the report
    so far when the run or a drill does not go through."""
    written = load_profile(profile_name, overrides)
    deployment = _deployment(written)
    store = store.resolve()
    root = Path(tempfile.mkdtemp(prefix=f"rehearse-{written.name}-"))
    # What the user set is not shrunk again; their data is sampled like the profile's.
    chosen = {override.split("=", 1)[0] for override in overrides} - set(DATA_SOURCE_FIELDS)
    data = sample_sources(written.data, root / "data")
    changes = [c for c in shrink(written, store.parent / f"{store.name}-published", data) if c.field not in chosen]
    metadata = SERVERS[written.train.spot_notice]() if written.train.spot_notice != "none" else None
    if metadata is not None:
        changes.append(Change("train.spot_notice_url", written.train.spot_notice_url, metadata.url,
                              f"the {metadata.cloud} instance metadata, stood in on loopback (flows/cloud_metadata.py)"))
    rehearsal_overrides = [*overrides, *change_overrides(changes)]
    rehearsed = load_profile(profile_name, rehearsal_overrides)
    report: dict[str, Any] = {
        "profile": written.name, "store": str(store), "logs": str(root),
        "world_size": rehearsed.train.world_size, "expert_parallel": rehearsed.train.expert_parallel,
        "nnodes": rehearsed.train.nnodes, "nproc_per_node": rehearsed.train.nproc_per_node,
        "launcher": rehearsed.train.launcher, "method": rehearsed.train.method,
        "pools": {"pipeline": rehearsed.deploy.work_pool, "gpu": rehearsed.deploy.gpu_work_pool,
                  "gpu_stages": rehearsed.deploy.gpu_stages},
        "shrunk": [asdict(change) for change in changes],
        # What the preflight refuses on the GPU cluster that the stand-ins here do not use (images, buckets).
        "before_renting": placeholders(written, ("deploy",)),
    }
    started = time.monotonic()
    log(f"rehearsing {written.name}: {len(changes)} fields shrunk; server, pools and workers in {root}")
    prefect_file, deployment_changes = stand_in_prefect_file(root)
    report["shrunk"] += [asdict(change) for change in deployment_changes]
    cluster = start_cluster(root, workers=0, store=store, stand_in_pools=_stand_in_pools(), prefect_file=prefect_file)
    try:
        cluster.start_worker("worker-pipeline", rehearsed.deploy.work_pool, WORKLOAD_NICENESS)
        for node in range(max(1, rehearsed.train.nnodes)):
            cluster.start_worker(f"worker-gpu-{node}", rehearsed.deploy.gpu_work_pool, WORKLOAD_NICENESS)
        # A production deployment takes its data as the data_source parameter; the embedded default's in overrides.
        params: dict[str, Any] = {"overrides": [o for o in rehearsal_overrides if not o.startswith("data.source=")]}
        if deployment["entrypoint"].endswith(":finetune_production"):
            params["data_source"] = rehearsed.data.source
        else:
            params["overrides"].append(f"data.source={rehearsed.data.source}")
        proc = cluster.prefect("deployment", "run", f"finetune/{written.name}", "--params", json.dumps(params))
        pipeline = next(line.split()[-1] for line in proc.stdout.splitlines() if "UUID:" in line)
        log(f"pipeline flow run {pipeline} (finetune/{written.name})")
        rehearsal = Rehearsal(cluster, rehearsed, pipeline, store, log, metadata)
        try:
            rehearsal.notice_drill()
            rehearsal.worker_drill()
            run = rehearsal.finish()
        except (RuntimeError, TimeoutError, AssertionError) as exc:
            report["drills"] = [asdict(d) for d in rehearsal.drills]
            raise RehearsalFailed(f"{exc}\n{_failure_context(cluster)}", report) from exc
        report.update(_results(cluster, written, rehearsed, store, rehearsal, run))
    finally:
        cluster.stop()
        if metadata is not None:
            metadata.close()
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    if problems := _problems(report, run):
        raise RehearsalFailed("; ".join(problems), report)
    return report


def _failure_context(cluster: LocalPrefect) -> str:
    tails = [f"--- {name} ---\n{cluster.logs(name)[-3000:]}" for name in cluster.procs if name.startswith("worker")]
    return "\n".join(tails)


def _results(cluster: LocalPrefect, written: Profile, rehearsed: Profile, store: Path, rehearsal: Rehearsal,
             run: dict[str, Any]) -> dict[str, Any]:
    """The report's findings: stages, drills, flow runs, the store's own record, memory, the Kubernetes Jobs."""
    from finetune.plan import plan
    from finetune.store import Store
    from tasks.run_report import find_run_record, record_artifacts

    runs = _flow_runs(cluster)
    results: dict[str, Any] = {
        "status": run["state"]["name"], "message": run["state"].get("message"),
        "drills": [asdict(d) for d in rehearsal.drills],
        "flow_runs": [{"id": r["id"], "name": r["name"], "flow": r["flow_name"], "state": r["state"]["name"],
                       "states": [s["name"] for s in cluster.api("GET", f"/flow_run_states/?flow_run_id={r['id']}")],
                       "pool": r["work_pool_name"], "stage": r["parameters"].get("stage"),
                       "node_rank": r["parameters"].get("node_rank")} for r in runs],
    }
    artifacts_store = Store(str(store))
    try:
        record = find_run_record(artifacts_store, written.name)
    except Exception as exc:  # no record: the run failed before writing it
        results["stages"] = {"error": str(exc)}
        return results
    artifacts = record_artifacts(artifacts_store, record)
    results["stages"] = {label: {"status": "cached" if info["cached"] else "completed", "seconds": info.get("seconds"),
                                 **({"engine": engine} if (engine := _engine(artifacts.get(label))) else {})}
                         for label, info in record["stages"].items()}
    results["skipped"] = record.get("skipped", {})
    if train := artifacts.get("train"):
        results["train"] = {name: train.metrics.get(name) for name in (
            "world_size", "expert_parallel", "steps", "checkpoints_by_reason", "first_loss", "last_loss",
            "peak_memory_gib")}
        planned = plan(rehearsed)
        results["memory"] = {
            "measured_peak_rss_gib_per_trainer": round(rehearsal.peak_rss_gib, 3),
            "recipe_peak_memory_gib_rank0": train.metrics.get("peak_memory_gib"),
            "planned_peak_gib_per_process": planned["per_gpu_peak_gib"],
            "note": "on CPU the measured figure is each trainer's resident set (Python, torch and the model's share); "
                    "the plan's is the training state and activations it sizes for a GPU of the same run",
        }
    results["kubernetes_jobs"] = _kubernetes_jobs(cluster, written, runs)
    return results


def _engine(artifact: Any) -> str | None:
    """What served or scored the model: a benchmark's engine, an evaluation's (vLLM, or lm-eval in-process)."""
    if artifact is None:
        return None
    if artifact.stage == "evaluate":
        from tasks.evaluate.report import RESULTS_FILE

        return json.loads((Path(artifact.path) / RESULTS_FILE).read_text())["finetune"]["engine"]
    metrics = artifact.metrics
    return metrics.get("engine") and f"{metrics['engine']} {metrics.get('engine_version', '')}".strip()


def _kubernetes_jobs(cluster: LocalPrefect, written: Profile, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each GPU flow run of the rehearsal rendered as the Job its Kubernetes pool would submit with the profile's
    job variables as written, and what the API server would refuse in it."""
    import asyncio

    from prefect.client.orchestration import PrefectClient

    from flows.k8s_jobs import job_problems, render_job

    if written.deploy.gpu_work_pool not in kubernetes_pools():
        return []
    gpu_runs = [r for r in runs if r["work_pool_name"] == written.deploy.gpu_work_pool and r["flow_name"] != "finetune"]

    async def render_all() -> list[dict[str, Any]]:
        rendered = []
        async with PrefectClient(api=cluster.api_url) as client:
            for run in gpu_runs:
                stage = run["parameters"].get("stage") or "train"
                variables = written.gpu_job_variables | written.deploy.stage_image(stage)
                job = await render_job(client, run["id"], variables)
                container = job["spec"]["template"]["spec"]["containers"][0]
                rendered.append({"flow_run": run["name"], "image": container.get("image"),
                                 "gpus": container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu"),
                                 "problems": job_problems(job)})
        return rendered

    return asyncio.run(render_all())


def _problems(report: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    problems = [] if run["state"]["type"] == "COMPLETED" else [f"the pipeline run ended {run['state']['name']}: "
                                                               f"{run['state'].get('message')}"]
    for drill in report.get("drills", []):
        if not drill["recovered"] or (drill["steps_lost"] or 0) > 1:
            problems.append(f"drill '{drill['kind']}' did not recover within one step: {drill}")
    for job in report.get("kubernetes_jobs", []):
        problems += [f"Kubernetes Job of {job['flow_run']}: {p}" for p in job["problems"]]
    return problems


def summary(report: Mapping[str, Any]) -> str:
    """The report for a terminal: the shape rehearsed, each stage, each drill, what was shrunk."""
    lines = [f"rehearsal of {report['profile']}: {report.get('status')} in {report.get('wall_seconds')} s; "
             f"{report['nnodes']} x {report['nproc_per_node']} processes (world {report['world_size']}, expert "
             f"parallel {report['expert_parallel']}), launcher {report['launcher']}, store {report['store']}"]
    for label, stage in report.get("stages", {}).items():
        lines.append(f"  {label:<18} {stage}")
    lines += [f"  drill: {d['kind']}: delivered at step {d['step_at_delivery']}, acted on at {d['step_at_notice']}, resumed from {d['resumed_from_step']}, "
              f"{d['steps_lost']} steps lost, {'recovered' if d['recovered'] else 'NOT recovered'}"
              for d in report.get("drills", [])]
    lines += [f"  before renting: {line}" for line in report.get("before_renting", [])]
    if memory := report.get("memory"):
        lines.append(f"  memory per trainer: {memory['measured_peak_rss_gib_per_trainer']} GiB resident (measured), "
                     f"{memory['planned_peak_gib_per_process']} GiB planned for the same shrunk run")
    lines.append("  shrunk: " + "; ".join(f"{c['field']} {c['as_written']!r} -> {c['rehearsed']!r}"
                                           for c in report["shrunk"]))
    return "\n".join(lines)
