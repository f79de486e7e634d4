"""finetune.procs: trainer subprocesses stream their lines, fail with their last lines, turn SIGTERM into Preempted
and never leave a descendant behind (not even one that moved to a session of its own, as torchrun workers do)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from finetune import procs
from finetune.procs import ProcessFailed, run_streaming
from finetune.stage import Preempted


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def detached_sleeper(pid_file: Path) -> str:
    """Code that starts a sleeper in a new session (like torchrun's workers) and records its pid."""
    return f"""
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(p.pid))
    """


def test_run_streaming_delivers_every_line_in_order_and_tags_later_processes() -> None:
    seen: list[str] = []
    run_streaming([python("for i in range(3): print('a', i)"), python("print('b')")], seen.append)
    assert [line for line in seen if line.startswith("a")] == ["a 0", "a 1", "a 2"]
    assert "[proc 1] b" in seen


def test_run_streaming_failure_names_exit_code_and_last_lines() -> None:
    with pytest.raises(ProcessFailed) as info:
        run_streaming([python("""
            import sys
            for i in range(100): print('line', i)
            print('boom: bad config key', file=sys.stderr); sys.exit(3)
        """)], lambda line: None)
    failure = info.value
    assert failure.returncode == 3
    assert len(failure.tail) == procs.TAIL_LINES
    assert failure.tail[-1] == "boom: bad config key"
    assert "exit code 3" in str(failure) and "line 99" in str(failure) and "line 0\n" not in str(failure)


def test_sigterm_is_forwarded_and_raises_preempted(tmp_path: Path) -> None:
    pid_file = tmp_path / "worker.pid"
    child = python(detached_sleeper(pid_file) + """
        import time
        print('ready', flush=True)
        time.sleep(600)
    """)

    def on_line(line: str) -> None:
        if line == "ready":
            os.kill(os.getpid(), signal.SIGTERM)  # what a spot reclaim does to the worker process

    started = time.monotonic()
    with pytest.raises(Preempted):
        run_streaming([child], on_line)
    assert time.monotonic() - started < 20
    assert not alive(int(pid_file.read_text())), "the detached worker outlived the preempted trainer"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "our SIGTERM handler was not removed"


class OuterTermination(BaseException):
    """What Prefect's engine raises from its SIGTERM handler (TerminationSignal)."""


def test_an_outer_sigterm_handler_stays_in_place_and_its_exception_comes_after_the_children_stop(
        tmp_path: Path) -> None:
    def outer(signum: int, frame: object) -> None:
        raise OuterTermination()

    pid_file = tmp_path / "worker.pid"
    child = python(detached_sleeper(pid_file) + """
        import signal, sys, time
        def stop(signum, frame):
            print('child got SIGTERM', flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print('ready', flush=True)
        time.sleep(600)
    """)
    seen: list[str] = []

    def on_line(line: str) -> None:
        seen.append(line)
        if line == "ready":
            # A `prefect flow-run execute` supervisor only asks an engine whose SIGTERM handler is still Prefect's.
            assert signal.getsignal(signal.SIGTERM) is outer
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, outer)
    try:
        with pytest.raises(OuterTermination):
            run_streaming([child], on_line)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not alive(int(pid_file.read_text())), "a descendant outlived the interrupted call"


def test_child_ignoring_sigterm_is_killed_after_the_grace_period() -> None:
    child = python("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print('ready', flush=True)
        time.sleep(600)
    """)
    started = time.monotonic()
    with pytest.raises(Preempted):
        run_streaming([child], lambda line: os.kill(os.getpid(), signal.SIGTERM) if line == "ready" else None,
                      term_grace_s=1.0)
    assert time.monotonic() - started < 15


def test_one_failing_node_process_takes_the_others_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procs, "PEER_GRACE_S", 0.5)
    pid_file = tmp_path / "peer.pid"
    peer = python(f"""
        import os, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(600)
    """)
    started = time.monotonic()
    with pytest.raises(ProcessFailed) as info:
        run_streaming([peer, python("import time, sys; time.sleep(1); print('node 1 fails'); sys.exit(7)")],
                      lambda line: None)
    assert info.value.returncode == 7
    assert "[proc 1] node 1 fails" in info.value.tail
    assert time.monotonic() - started < 15
    assert not alive(int(pid_file.read_text()))


def test_orphaned_worker_in_its_own_session_is_killed_when_the_launcher_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(procs, "ORPHAN_GRACE_S", 0.2)
    pid_file = tmp_path / "orphan.pid"
    run_streaming([python(detached_sleeper(pid_file))], lambda line: None)  # exits at once, worker keeps the pipe
    assert not alive(int(pid_file.read_text()))


def test_children_get_sigterm_when_the_process_running_them_is_killed_outright(tmp_path: Path) -> None:
    """SIGKILL leaves no time to clean up: the kernel's parent-death signal stops the trainer instead."""
    pid_file, got_term = tmp_path / "child.pid", tmp_path / "child.term"
    child = python(f"""
        import os, signal, sys, time
        def stop(signum, frame):
            open({str(got_term)!r}, "w").write("SIGTERM")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(600)
    """)
    runner = subprocess.Popen([sys.executable, "-c", f"from finetune.procs import run_streaming; "
                                                     f"run_streaming([{child!r}], print)"], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    child_pid = int(pid_file.read_text())
    runner.kill()
    runner.wait()
    deadline = time.monotonic() + 10
    while alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child_pid), "the child outlived the killed process that ran it"
    assert got_term.read_text() == "SIGTERM"
