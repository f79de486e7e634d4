"""One computation per stage key: a second run waits for the first and takes its artifact; a dead holder never
blocks; a holder's children keep the key locked until they are gone; a lease that cannot be renewed is given up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import fsspec
import pytest

from finetune.procs import run_streaming
from finetune.profile import load_profile
from finetune.stage import PermanentError, StageContext, StageSpec, execute_stage
from finetune.stage_lock import LOCKS_DIR, stage_lock
from finetune.store import Store

PROFILE = load_profile("tiny-cpu")


def _slow_spec(calls: list[str], seconds: float) -> StageSpec:
    def run(ctx: StageContext) -> dict:
        calls.append(ctx.key)
        time.sleep(seconds)
        (ctx.workdir / "out.txt").write_text("done")
        return {"value": 1}

    return StageSpec(name="slow", version="1", run=run, config=lambda p: {})


def test_two_runs_of_one_key_compute_it_once_and_the_waiter_takes_the_artifact(tmp_path: Path) -> None:
    store, calls, logs = Store(tmp_path), [], []
    results: dict[str, tuple] = {}

    def one_run(name: str) -> None:
        results[name] = execute_stage(_slow_spec(calls, 1.5), PROFILE, store, {}, run=name, log_fn=logs.append)

    first = threading.Thread(target=one_run, args=("run-a",))
    first.start()
    time.sleep(0.3)
    one_run("run-b")
    first.join()
    assert len(calls) == 1
    (a, _), (b, _) = results["run-a"], results["run-b"]
    assert a.key == b.key and a.path == b.path and a.metrics == b.metrics
    assert a.timings["computed_by"].startswith("run-a") and b.timings["computed_by"] == a.timings["computed_by"]
    waiting = next(line for line in logs if "waiting for it" in line)
    assert "run-a (pid" in waiting and " since 20" in waiting
    assert any("taking the artifact run-a" in line for line in logs)


def test_the_wait_is_bounded_by_retries_lock_timeout_s(tmp_path: Path) -> None:
    store = Store(tmp_path)
    profile = load_profile("tiny-cpu", ["retries.lock_timeout_s=1"])
    spec = _slow_spec([], 0)
    with stage_lock(store, "slow", _key(spec, profile), owner="holder-run", timeout_s=None, log=print,
                    progress=lambda f, m: None):
        started = time.monotonic()
        with pytest.raises(PermanentError, match=r"waited 1 s for holder-run .*retries.lock_timeout_s"):
            execute_stage(spec, profile, store, {})
    assert 1 <= time.monotonic() - started < 4
    assert profile.retries.count == 1  # `retries.lock_timeout_s=` beside `retries: {count: 1}` keeps the count


def test_old_profiles_with_an_integer_retries_still_load() -> None:
    assert load_profile("tiny-cpu", ["retries=3"]).retries.count == 3


_HOLDER = textwrap.dedent("""
    import sys, time
    from finetune.procs import run_streaming
    from finetune.stage_lock import stage_lock
    from finetune.store import Store
    # The child stands for a trainer that saves a checkpoint on SIGTERM (its engine died) before it exits.
    child = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(2), sys.exit(0))); " \\
            "print('child up', flush=True); time.sleep(60)"
    with stage_lock(Store(sys.argv[1]), "train", "k" * 64, owner="holder", timeout_s=None, log=lambda line: None,
                    progress=lambda f, m: None) as lease:
        run_streaming([[sys.executable, "-c", child]], lambda line: print(line, flush=True), pass_fds=lease.fds)
""")


def test_a_killed_holder_frees_the_key_once_its_trainer_is_gone(tmp_path: Path) -> None:
    """kill -9 of the run holding the key: the kernel releases the lock, but only after the trainer that inherited
    it (still saving on its way out) has exited, so the two never write the stage directory at once."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[1])
    assert holder.stdout.readline().strip() == "child up"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    killed = time.monotonic()
    logs: list[str] = []
    with stage_lock(Store(tmp_path), "train", "k" * 64, owner="taker", timeout_s=30, log=logs.append,
                    progress=lambda f, m: None, poll_s=0.1):
        waited = time.monotonic() - killed
    assert 1.5 < waited < 10, waited
    assert any("holder" in line and "waiting" in line for line in logs)
    assert (tmp_path / LOCKS_DIR / "train" / f"{'k' * 64}.lock").is_file()


def test_a_lease_on_a_remote_store_expires_when_its_holder_stops_renewing(tmp_path: Path) -> None:
    store = Store("memory://lease-expiry")
    path = f"{store.root}/{LOCKS_DIR}/train/{'k' * 64}.lease"
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    # A holder that died 3 s ago, with a 4 s lease: it is free 1 s from now.
    store.fs.pipe(path, (f'{{"owner": "dead run", "since": "x", "token": "t", "renewed": {time.time() - 3}, '
                         f'"ttl_s": 4}}').encode())
    logs: list[str] = []
    started = time.monotonic()
    with stage_lock(store, "train", "k" * 64, owner="taker", timeout_s=30, log=logs.append,
                    progress=lambda f, m: None, poll_s=0.2, ttl_s=4, settle_s=0.1) as lease:
        waited = time.monotonic() - started
        assert not lease.lost.is_set()
    assert 0.5 < waited < 3
    assert any("dead run" in line for line in logs)
    assert not store.fs.exists(path)  # released


def test_a_holder_that_loses_its_lease_stops_its_children_at_once(tmp_path: Path) -> None:
    store = Store("memory://lease-lost")
    key = "k" * 64
    path = f"{store.root}/{LOCKS_DIR}/train/{key}.lease"
    outcome: dict[str, float] = {}
    with stage_lock(store, "train", key, owner="holder", timeout_s=5, log=print, progress=lambda f, m: None,
                    poll_s=0.1, ttl_s=2, settle_s=0.1) as lease:
        def steal() -> None:
            time.sleep(0.5)
            store.fs.pipe(path, b'{"owner": "thief", "token": "other", "renewed": 1e12, "ttl_s": 2}')
            outcome["stolen"] = time.monotonic()

        threading.Thread(target=steal).start()
        with pytest.raises(Exception, match="failed with signal 9"):
            run_streaming([[sys.executable, "-c", "import time; time.sleep(60)"]], lambda line: None,
                          stop=lease.lost)
        outcome["stopped"] = time.monotonic()
    assert lease.lost.is_set() and outcome["stopped"] - outcome["stolen"] < 2  # renewal every ttl/4 notices


def _key(spec: StageSpec, profile) -> str:
    from finetune.stage import stage_key

    return stage_key(spec, profile, {})


@pytest.fixture(autouse=True)
def _fresh_memory_store():
    fsspec.filesystem("memory").store.clear()
    yield
