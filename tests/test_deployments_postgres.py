"""The Prefect server on PostgreSQL instead of SQLite: same pools, deployments and a real flow run.

A private PostgreSQL cluster is created with initdb/pg_ctl in a temp directory on a free loopback port; the test is
skipped where PostgreSQL's server binaries are not installed (Debian: apt-get install postgresql).
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune.procs import free_port
from flows.local_cluster import start_cluster

pytestmark = pytest.mark.e2e


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


INITDB, PG_CTL = _pg_bin("initdb"), _pg_bin("pg_ctl")


def _as_owner(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: use the 'postgres' account the Debian package creates.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres() -> Iterator[str]:
    if INITDB is None or PG_CTL is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' account to run PostgreSQL as")
    base = Path(tempfile.mkdtemp(prefix="prefect-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    port = free_port()
    subprocess.run(_as_owner([INITDB, "-D", str(data), "-U", "prefect", "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True, timeout=120)
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
    subprocess.run(_as_owner([PG_CTL, "-D", str(data), "-o", options, "-l", str(base / "pg.log"), "-w", "start"]),
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_owner([PG_CTL, "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True,
                       timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def _count(url: str, table: str) -> int:
    import asyncpg

    async def query() -> int:
        connection = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            return int(await connection.fetchval(f"select count(*) from {table}"))
        finally:
            await connection.close()

    return asyncio.run(query())


def test_prefect_server_on_postgres_deploys_and_runs_the_pipeline(postgres: str, tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, extra_env={"PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres}, workers=1)
    try:
        run, _ = cluster.run_deployment("finetune/tiny-cpu", {"until": "download"})
        assert run["state"]["type"] == "COMPLETED"
        # Everything the server knows lives in PostgreSQL.
        assert _count(postgres, "deployment") == len(cluster.api("POST", "/deployments/filter", {}))
        assert _count(postgres, "flow_run") >= 1 and _count(postgres, "work_pool") >= 4
    finally:
        cluster.stop()
    assert all(proc.returncode is not None for proc in cluster.procs.values())
