"""Run a long-lived child process (a trainer) with its output streamed line by line.

The child starts in its own session so that it and everything it spawns can be signalled as a group. SIGTERM sent to
us (how spot preemption arrives) is forwarded to the child's group and surfaces as ``Preempted`` once the child has
exited, so the stage is retried and resumes from its checkpoints. Any other non-zero exit raises ``ProcessFailed``
with the child's last log lines. Whatever happens, no descendant outlives the call.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import psutil

from finetune.stage import Preempted

TAIL_LINES = 40


class ProcessFailed(RuntimeError):
    """The child exited non-zero (not because we were preempted). ``tail`` holds its last log lines."""

    def __init__(self, cmd: Sequence[str], returncode: int, tail: list[str]):
        self.cmd = list(cmd)
        self.returncode = returncode
        self.tail = tail
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        lines = "\n".join(f"  | {line}" for line in tail) or "  | (no output)"
        super().__init__(f"{Path(cmd[0]).name} failed with {how}; last {len(tail)} log lines:\n{lines}")


def run_streaming(
    cmd: Sequence[str],
    on_line: Callable[[str], None],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    term_grace_s: float = 30.0,
    tail_lines: int = TAIL_LINES,
) -> None:
    """Run ``cmd``, calling ``on_line`` (in this thread) for every line of its merged stdout/stderr.

    Raises ``Preempted`` if we received SIGTERM while it ran, ``ProcessFailed`` if it exited non-zero.
    ``term_grace_s`` is how long a SIGTERMed child gets to exit before its group is killed.
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    proc = subprocess.Popen(
        list(cmd), cwd=cwd, env=None if env is None else dict(env), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, bufsize=1, text=True,
        errors="replace",
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc, lines), daemon=True, name=f"pump-{proc.pid}")
    reader.start()
    terminated = threading.Event()
    descendants: dict[int, psutil.Process] = {}

    def forward_sigterm(signum: int, frame: object) -> None:
        terminated.set()
        _signal_group(proc.pid, signal.SIGTERM)

    previous = _install_sigterm(forward_sigterm)
    try:
        kill_at: float | None = None
        last_scan = 0.0
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                tail.append(line)
                on_line(line)
            now = time.monotonic()
            if now - last_scan > 2.0:
                # Launchers such as torchrun put their workers in sessions of their own: remember them so they can
                # be killed even after their parent is gone.
                _remember_descendants(proc.pid, descendants)
                last_scan = now
            if terminated.is_set() and kill_at is None:
                kill_at = now + term_grace_s
            if proc.poll() is not None and kill_at is None:
                # Exited, yet someone still holds the pipe open: an orphaned worker. Give it a moment, then kill it.
                kill_at = now + 5.0
            if kill_at is not None and now > kill_at:
                _kill_all(proc.pid, descendants)
        returncode = proc.wait()
        if terminated.is_set():
            raise Preempted(f"received SIGTERM; {Path(cmd[0]).name} stopped (exit {returncode}) and will resume")
        if returncode != 0:
            raise ProcessFailed(cmd, returncode, list(tail))
    finally:
        _restore_sigterm(previous)
        _remember_descendants(proc.pid, descendants)
        _kill_all(proc.pid, descendants)
        proc.wait()
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line.rstrip("\r\n"))
    lines.put(None)


_NOT_INSTALLED = object()


def _install_sigterm(handler: Callable[[int, object], None]) -> object:
    """Signal handlers can only be set from the main thread; elsewhere the caller's own handling applies."""
    if threading.current_thread() is not threading.main_thread():
        return _NOT_INSTALLED
    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous: object) -> None:
    if previous is not _NOT_INSTALLED:
        signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _remember_descendants(pid: int, seen: dict[int, psutil.Process]) -> None:
    try:
        for child in psutil.Process(pid).children(recursive=True):
            seen.setdefault(child.pid, child)
    except psutil.Error:
        pass


def _kill_all(pgid: int, descendants: dict[int, psutil.Process]) -> None:
    _signal_group(pgid, signal.SIGKILL)
    for process in descendants.values():
        try:
            if process.is_running():  # also checks the pid was not reused by an unrelated process
                if os.getpgid(process.pid) == process.pid:
                    _signal_group(process.pid, signal.SIGKILL)  # a session leader: its own children go with it
                process.kill()
        except (psutil.Error, ProcessLookupError):
            pass
