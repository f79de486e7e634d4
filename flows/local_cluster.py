"""A real Prefect server on loopback with this project's work pools, deployments and process workers.

What `finetune rehearse`, the deployment tests and bench/bench_deployment.py drive the pipeline through, exactly as a
user would: `prefect server start` on a free port, `bash deployments/create-pools.sh`, process workers, and
`prefect --no-prompt deploy --all` from the checkout. Every process it starts is stopped by ``LocalPrefect.stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from finetune.procs import free_port
from finetune.profile import REPO_ROOT

BIN = Path(sys.executable).parent


def prefect_env(root: Path, api_url: str, extra: dict[str, str] | None = None,
                store: Path | None = None) -> dict[str, str]:
    """Environment of every process: this server's API, a Prefect home under ``root``, the artifact store (default
    ``root``/store), and nothing inherited from the caller's PREFECT_/FINETUNE_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FINETUNE_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PWD=str(REPO_ROOT),  # what prefect.yaml's `{{ $PWD }}` reads when `prefect deploy` runs there
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_API_URL=api_url,
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        FINETUNE_STORE=str(store or root / "store"),
        FINETUNE_SCRATCH=str(root / "scratch"),
        FINETUNE_NODE_ADDR="127.0.0.1",
        PYTHONUNBUFFERED="1",
        OMP_WAIT_POLICY="PASSIVE",  # torch processes share the cores: none may spin (entrypoints/cli.py)
        **(extra or {}),
    )
    return env


API_ATTEMPTS = 5


@dataclass
class LocalPrefect:
    """The started server and workers (``procs`` by name, logs in ``root``), and helpers that use them."""

    root: Path
    api_url: str
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    deploy_output: str = ""

    def prefect(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO_ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}\n--- worker logs ---\n{self.logs('worker-1')[-4000:]}")
        return proc

    def start_worker(self, name: str, pool: str, niceness: int = 0) -> None:
        """A process worker; with ``niceness`` it and every flow run it starts run at that lower priority."""
        self.start(name, "worker", "start", "--pool", pool, "--type", "process", "--name", name, niceness=niceness)

    def start(self, name: str, *args: str, niceness: int = 0) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen([str(BIN / "prefect"), *args], cwd=REPO_ROOT, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=(lambda: os.nice(niceness)) if niceness else None)

    def logs(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request to the server's REST API. A 503 is the server's answer to a database error worth retrying
        (SQLite's "database is locked" while another write is out, seen on deleting a schedule as its run ended),
        and is retried as Prefect's own client retries it."""
        for attempt in range(1, API_ATTEMPTS + 1):
            response = httpx.request(method, f"{self.api_url}{path}", json=body, timeout=90)  # a loaded 2-core server
            if response.status_code != 503 or attempt == API_ATTEMPTS:
                break
            time.sleep(attempt)
        response.raise_for_status()
        return response.json() if response.content else None

    def run_deployment(self, name: str, params: dict[str, Any], env: dict[str, str] | None = None,
                       ) -> tuple[dict[str, Any], float]:
        """`prefect deployment run NAME --watch`: the flow run as the API reports it, and the seconds it took."""
        args = ["deployment", "run", name, "--params", json.dumps(params), "--watch", "--watch-interval", "1"]
        if env:
            args += ["--job-variable", f"env={json.dumps(env)}"]
        started = time.perf_counter()
        proc = self.prefect(*args, check=False)
        seconds = time.perf_counter() - started
        run_id = next(line.split()[-1] for line in proc.stdout.splitlines() if "UUID:" in line)
        run = self.api("GET", f"/flow_runs/{run_id}")
        if proc.returncode != 0:
            raise RuntimeError(f"{name} ended {run['state']['name']}: {run['state'].get('message')}\n"
                               f"{proc.stdout[-3000:]}\n--- worker ---\n{self.logs('worker-1')[-6000:]}"
                               f"\n{self.logs('worker-2')[-6000:]}")
        return run, seconds

    def run_logs(self, run_ids: list[str]) -> list[dict[str, Any]]:
        """Every log line of these flow runs, oldest first (the API returns at most 200 per call)."""
        logs: list[dict[str, Any]] = []
        while batch := self.api("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": run_ids}},
                                                          "sort": "TIMESTAMP_ASC", "limit": 200, "offset": len(logs)}):
            logs += batch
        return logs

    def children(self, parent_id: str, flow_name: str | None = None) -> list[dict[str, Any]]:
        runs = self.api("POST", "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}})
        if flow_name is None:
            return runs
        flows = {f["id"]: f["name"] for f in self.api("POST", "/flows/filter", {})}
        return [r for r in runs if flows[r["flow_id"]] == flow_name]

    def stop(self) -> None:
        """Workers get SIGINT twice (an idle worker needs both), then the flow runs they started (each in a session of
        its own) and what those started SIGTERM, then the server SIGTERM; stragglers are killed."""
        workers = [p for n, p in self.procs.items() if n.startswith("worker")]
        for sig in (signal.SIGINT, signal.SIGINT):
            for proc in workers:
                if proc.poll() is None:
                    os.killpg(proc.pid, sig)
            time.sleep(1)
        self._stop_flow_runs()
        for name, proc in self.procs.items():
            if proc.poll() is None and not name.startswith("worker"):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


    def _stop_flow_runs(self) -> None:
        """Every process still running against this server (flow runs interrupted mid-way, their trainers and
        inference servers: they inherit PREFECT_API_URL), SIGTERM then SIGKILL after 30 s."""
        import psutil

        started_here = {os.getpid(), *(proc.pid for proc in self.procs.values())}

        def ours() -> list[psutil.Process]:
            found = []
            for process in psutil.process_iter():
                try:
                    if process.pid not in started_here and process.environ().get("PREFECT_API_URL") == self.api_url:
                        found.append(process)
                except psutil.Error:
                    continue
            return found

        for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
            for process in (running := ours()):
                with contextlib.suppress(psutil.Error):
                    process.send_signal(sig)
            psutil.wait_procs(running, timeout=wait_s)


def wait_healthy(cluster: LocalPrefect, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cluster.procs["server"].poll() is not None:
            raise RuntimeError(f"prefect server exited:\n{cluster.logs('server')[-4000:]}")
        try:
            if httpx.get(f"{cluster.api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout_s}s:\n{cluster.logs('server')[-4000:]}")


def start_server(root: Path, extra_env: dict[str, str] | None = None, store: Path | None = None) -> LocalPrefect:
    """A Prefect server on a free loopback port, healthy, with nothing registered on it."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server = LocalPrefect(root=root, api_url=api_url, env=prefect_env(root, api_url, extra_env, store))
    server.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
    try:
        wait_healthy(server)
    except BaseException:
        server.stop()
        raise
    return server


def start_cluster(root: Path, extra_env: dict[str, str] | None = None, workers: int = 2,
                  store: Path | None = None, stand_in_pools: Sequence[str] = (),
                  prefect_file: Path | None = None) -> LocalPrefect:
    """Server, pools and deployments (of ``prefect_file``, default prefect.yaml), ``workers`` process workers on
    `local-process`; ``stand_in_pools`` are created as process pools (from deployments/process-pool.json) under their
    own names, so that deployments and dispatch meant for them run unchanged on this machine."""
    cluster = start_server(root, extra_env, store)
    try:
        subprocess.run(["bash", str(REPO_ROOT / "deployments" / "create-pools.sh"), "all" if not stand_in_pools
                        else "local"], cwd=REPO_ROOT, env=cluster.env, check=True, capture_output=True, timeout=300)
        for pool in stand_in_pools:
            cluster.prefect("work-pool", "create", pool, "--type", "process", "--base-job-template",
                            str(REPO_ROOT / "deployments" / "process-pool.json"), "--overwrite")
        for index in range(1, workers + 1):
            cluster.start_worker(f"worker-{index}", "local-process")
        deployed = cluster.prefect("deploy", "--all", *(["--prefect-file", str(prefect_file)] if prefect_file else []))
        cluster.deploy_output = deployed.stdout + deployed.stderr
    except BaseException:
        cluster.stop()
        raise
    return cluster
