"""Does each GPU work pool this run submits to exist and have a worker ready to take its flow runs?
(finetune.preflight) Without one a submitted run waits in Scheduled/Late forever, after the download was paid."""

from __future__ import annotations

import time
from collections.abc import Callable

POLL_S = 2.0


def start_hint(pool: str) -> str:
    return (f"start a worker for it (`prefect worker start --pool {pool}` on a machine that reaches the cluster, or "
            f"the prefect-worker Helm chart with workPool {pool})")


def check_pools(pools: list[str], wait_s: float = 0.0, log: Callable[[str], None] = print) -> list[str]:
    """One line per pool that does not exist or has no ONLINE worker after waiting ``wait_s`` seconds
    (deploy.wait_for_workers_s)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    problems = []
    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                problems.append(f"work pool {pool} does not exist on {client.api_url}: create it with `bash "
                                f"deployments/create-pools.sh`, then {start_hint(pool)}")
                continue
            deadline = time.monotonic() + wait_s
            if wait_s > 0:
                log(f"waiting up to {wait_s:.0f} s (deploy.wait_for_workers_s) for a ready worker in pool {pool}")
            while not _ready(client, pool):
                if time.monotonic() >= deadline:
                    waited = f" within {wait_s:.0f} s" if wait_s > 0 else ""
                    problems.append(f"work pool {pool} has no ready worker{waited}: {start_hint(pool)}, or set "
                                    "deploy.wait_for_workers_s to wait for one")
                    break
                time.sleep(POLL_S)
    return problems


def _ready(client, pool: str) -> bool:
    from prefect.client.schemas.objects import WorkerStatus

    return any(worker.status == WorkerStatus.ONLINE for worker in client.read_workers_for_work_pool(pool))
