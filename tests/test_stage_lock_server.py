"""One computation per stage key through a real Prefect server: a global concurrency limit per key with a lease.

Processes contend for one key with a stage that sleeps (no trainer): they compute one after another even on stores
that share nothing, the waiter names the holder, the limit is gone afterwards; a holder killed outright is taken over
once its last process (a saving child) is gone; a holder that cannot renew its lease (server frozen with SIGSTOP)
kills its children before the lease could expire. A frozen holder: tests/test_deployments_server.py.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune.profile import REPO_ROOT
from flows.local_cluster import LocalPrefect, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LEASE_S = 60  # the shortest lease the server accepts

_CONTENDER = textwrap.dedent("""
    import dataclasses, json, sys, time
    from finetune.procs import run_streaming
    from finetune.stage_lock import stage_lock
    from finetune.store import Store
    from flows.server_lease import server_lock
    store, owner, hold, saving = Store(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[6] == "saving"
    # A saving child, like a trainer finishing its notice checkpoint, outlives the SIGTERM its parent's death sends.
    ignore = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if saving else ""
    child = f"{ignore}import time; time.sleep({hold})"
    with stage_lock(store, "slow", "k" * 64, owner=owner, timeout_s=300, log=lambda line: print(line, flush=True),
                    progress=lambda f, m: None, poll_s=0.5, server_lock=server_lock(float(sys.argv[4])),
                    elsewhere=sys.argv[5] == "elsewhere") as lease:
        print(f"ACQUIRED {time.time()} {json.dumps(dataclasses.asdict(lease.server))}", flush=True)
        try:  # the stage: a child process, stopped at once when the lease is lost
            print(f"CHILD {time.time()}", flush=True)
            run_streaming([[sys.executable, "-c", child]], print, stop=lease.lost, pass_fds=lease.fds)
        except Exception as exc:
            print(f"STOPPED {time.time()} lost={lease.lost.is_set()} {exc}", flush=True)
        print(f"RELEASING {time.time()}", flush=True)
""")


# A pool node run's part (flows/node_runs.run_node): renew the stage's lease (argv[1], JSON) while its trainer runs.
_NODE = textwrap.dedent("""
    import json, sys, time
    from finetune.procs import run_streaming
    from finetune.stage_lock import LeaseLost, ServerLease
    from flows.server_lease import renew_server_lease
    try:
        with renew_server_lease(ServerLease(**json.loads(sys.argv[1])), "node", print) as lost:
            print(f"TRAINING {time.time()}", flush=True)
            run_streaming([[sys.executable, "-c", f"import time; time.sleep({sys.argv[2]})"]], print, stop=lost)
    except LeaseLost as exc:
        print(f"REFUSED {time.time()} {exc}", flush=True)
    print(f"ENDED {time.time()}", flush=True)
""")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPrefect]:
    # Expired leases are looked for every 15 s by default: every second here, so takeover times are the lease's.
    started = start_server(tmp_path_factory.mktemp("stage-lock-server"),
                           {"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1"})
    try:
        yield started
    finally:
        started.stop()


def _contender(server: LocalPrefect, store: Path, owner: str, hold_s: float, elsewhere: bool = False,
               saving: bool = False) -> subprocess.Popen[str]:
    """A run computing the key ``hold_s`` seconds in a child; ``elsewhere``: as a stage whose trainers run on other
    machines; ``saving``: its child outlives it, as a trainer saving on notice does."""
    return subprocess.Popen([sys.executable, "-c", _CONTENDER, str(store), owner, str(hold_s), str(LEASE_S),
                             "elsewhere" if elsewhere else "here", "saving" if saving else "plain"],
                            cwd=REPO_ROOT, env=server.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_line(proc: subprocess.Popen[str], prefix: str, seen: list[str]) -> float:
    """Read the process's output until a line starting with ``prefix``; its timestamp."""
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(prefix):
            return float(line.split()[1])
    raise AssertionError(f"no {prefix} line:\n{''.join(seen)}")


def _key_limits(server: LocalPrefect) -> list[str]:
    return [limit["name"] for limit in server.api("POST", "/v2/concurrency_limits/filter", {"limit": 200})
            if limit["name"].startswith("finetune-key-")]


def test_runs_on_stores_that_share_nothing_compute_one_key_one_at_a_time(server: LocalPrefect,
                                                                         tmp_path: Path) -> None:
    holder = _contender(server, tmp_path / "a", "owner-a", 6)
    out_a: list[str] = []
    acquired_a = _wait_line(holder, "ACQUIRED", out_a)
    assert any("computing under Prefect global concurrency limit finetune-key-slow-kkkkkkkkkkkkkkkk" in line
               for line in out_a), out_a
    assert _key_limits(server) == ["finetune-key-slow-kkkkkkkkkkkkkkkk"]  # created on demand
    # b shares a's store (and learns who holds the key from it); c's store is its own: only the server stops it.
    waiters = {name: _contender(server, tmp_path / store, f"owner-{name}", 2) for name, store in (("b", "a"),
                                                                                                 ("c", "c"))}
    outs: dict[str, list[str]] = {"a": out_a, "b": [], "c": []}
    spans = {"a": (acquired_a, _wait_line(holder, "RELEASING", out_a))}
    for name, proc in waiters.items():
        spans[name] = (_wait_line(proc, "ACQUIRED", outs[name]), _wait_line(proc, "RELEASING", outs[name]))
    for proc in (holder, *waiters.values()):
        assert proc.wait(60) == 0
    ordered = sorted(spans.values())
    assert all(earlier[1] <= later[0] for earlier, later in itertools.pairwise(ordered)), spans  # never two at once
    assert any("owner-a" in line and "waiting for it" in line for line in outs["b"]), outs["b"]
    assert any("waiting for it" in line for line in outs["c"]), outs["c"]
    assert _key_limits(server) == []  # removed after


# A frozen holder (SIGSTOP of it and its trainer-like child) is taken over once its lease expires, its processes
# killed: drilled through a deployment, a worker and the lost-worker automation in tests/test_deployments_server.py
# (test_a_lost_worker_s_run_is_marked_crashed_rescheduled_and_resumes_on_a_new_worker).


def test_a_holder_that_cannot_renew_its_lease_stops_its_stage_before_it_expires(server: LocalPrefect,
                                                                               tmp_path: Path) -> None:
    holder = _contender(server, tmp_path / "a", "owner-a", 600)
    out: list[str] = []
    acquired = _wait_line(holder, "ACQUIRED", out)
    os.killpg(server.procs["server"].pid, signal.SIGSTOP)  # unreachable, as in a network partition
    try:
        stopped = _wait_line(holder, "STOPPED", out)
    finally:
        os.killpg(server.procs["server"].pid, signal.SIGCONT)
    assert "lost=True" in out[-1], out
    # Renewed last at most LEASE_S/4 after acquiring; stopped half a lease after that: before the lease can expire.
    assert stopped - acquired < LEASE_S * 3 / 4 + 3, stopped - acquired
    assert any(f"could not renew the lease on finetune-key-slow-{'k' * 16} for {LEASE_S / 2:g} s" in line
               for line in out), out
    assert holder.wait(120) == 0
    print(f"\nserver frozen: the holder stopped its stage {stopped - acquired:.1f} s after acquiring "
          f"(lease {LEASE_S} s)")


def test_a_killed_holder_s_key_is_taken_once_its_last_process_is_gone_not_a_lease_later(server: LocalPrefect,
                                                                                     tmp_path: Path) -> None:
    """kill -9 of a holder whose stage runs on its own machine (as Prefect's runner kills an engine that did not
    acknowledge a reschedule in time) while its child, like a trainer saving on notice, outlives it: the next run on
    that store waits while the child holds the store's lock, then releases the dead holder's server lease at once
    instead of waiting a lease for it."""
    import psutil

    holder = _contender(server, tmp_path / "a", "owner-a", 8, saving=True)
    _wait_line(holder, "CHILD", [])
    time.sleep(1)
    (child,) = psutil.Process(holder.pid).children()
    taker = _contender(server, tmp_path / "a", "owner-b", 0.1)
    time.sleep(2)
    holder.kill()
    holder.wait()
    killed = time.time()
    while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:  # an orphan waits for init to reap it
        time.sleep(0.05)  # it ignores the SIGTERM of its parent's death and ends when its 8 s are up
    child_gone = time.time()
    out: list[str] = []
    acquired = _wait_line(taker, "ACQUIRED", out)
    assert acquired >= child_gone - 0.5, (acquired - killed, child_gone - killed)  # never beside the saving child
    assert acquired - child_gone < 10, acquired - child_gone  # polls every 0.5 s; a lease would be LEASE_S
    assert any("owner-a" in line and "died holding" in line and "released its server lease" in line
               for line in out), out
    assert taker.wait(60) == 0
    print(f"\nkill -9 of a holder whose child saved {child_gone - killed:.1f} s more: taken over "
          f"{acquired - child_gone:.1f} s after the child ended (lease {LEASE_S} s)")


def test_node_runs_keep_the_key_taken_after_the_run_that_took_it_is_killed(server: LocalPrefect, tmp_path: Path) -> None:
    """train.launcher prefect-pool: the stage's node runs renew its lease, so kill -9 of the orchestrating run does
    not free the key while they train, even for a run on its store, which finds no process holding the store's lock;
    it is free one lease after the last node ended. A node handed a lease that is gone refuses to start its trainer."""
    holder = _contender(server, tmp_path / "a", "owner-a", 600, elsewhere=True)
    seen: list[str] = []
    _wait_line(holder, "ACQUIRED", seen)
    lease = seen[-1].split(" ", 2)[2].strip()
    train_s = LEASE_S + 5  # outlives the holder's lease (renewed last before the kill): only the node keeps the key
    node = subprocess.Popen([sys.executable, "-c", _NODE, lease, str(train_s)], cwd=REPO_ROOT, env=server.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node_out: list[str] = []
    _wait_line(node, "TRAINING", node_out)
    holder.kill()
    holder.wait()
    taker = _contender(server, tmp_path / "a", "owner-b", 0.1)
    ended = _wait_line(node, "ENDED", node_out)
    assert not any(line.startswith("STOPPED") or "stopping" in line for line in node_out), node_out
    out: list[str] = []
    acquired = _wait_line(taker, "ACQUIRED", out)
    assert not any("released its server lease" in line for line in out), out
    # The node renewed every LEASE_S/4 until it ended; the lease ran out LEASE_S after its last renewal.
    assert LEASE_S * 3 / 4 - 5 < acquired - ended < LEASE_S + 15, acquired - ended
    assert taker.wait(60) == 0 and node.wait(10) == 0
    stale = subprocess.run([sys.executable, "-c", _NODE, lease, "600"], cwd=REPO_ROOT, env=server.env, text=True,
                           capture_output=True, timeout=60)
    assert "REFUSED" in stale.stdout and "is gone" in stale.stdout and "TRAINING" not in stale.stdout, stale.stdout
    print(f"\nkill -9 of the orchestrator: the key stayed taken while its node trained ({train_s} s); taken "
          f"{acquired - ended:.1f} s after the node ended (lease {LEASE_S} s)")
