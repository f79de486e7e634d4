"""Run long-lived child processes (trainers, one per node process) with their output streamed line by line.

Each child starts in its own session so that it and everything it spawns can be signalled as a group. A spot notice
(finetune/notice.py: SIGTERM to this process, from whatever thread we run in, or a cloud's metadata notice) is
forwarded to every child as SIGTERM, and once they have exited it surfaces as ``Preempted``; a notice that came
before we start anything starts nothing. Without the process-wide handler (a plain caller on the main thread),
SIGTERM is handled here only while the children run; a Python handler found in place is left alone and whatever it
raises stops the children first.
A non-zero exit raises ``ProcessFailed`` with the last log lines. Whatever happens, no descendant outlives the call:
every child carries a per-call cookie in its environment, which its descendants inherit, so even a worker that moved
to a session of its own (torchrun starts workers that way) and was orphaned is found and killed; and if we are
killed outright, the children get SIGTERM from the kernel (finetune/deathsig.py).
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence

import psutil

from finetune import deathsig, notice
from finetune.stage import Preempted

TAIL_LINES = 40
COOKIE_VAR = "FINETUNE_PROCS_COOKIE"
# After one child fails, how long the others get to notice and exit on their own before they are killed.
PEER_GRACE_S = 15.0
# After every child exited, how long a descendant may keep their output pipe open before it is killed as an orphan.
ORPHAN_GRACE_S = 2.0
# How long a SIGKILLed process may take to die before we stop waiting for it.
KILL_WAIT_S = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now, for a child server or rendezvous to bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ProcessFailed(RuntimeError):
    """A child exited non-zero (not because we were preempted). ``tail`` holds the last log lines of all children."""

    def __init__(self, cmd: Sequence[str], returncode: int, tail: list[str]):
        self.cmd = list(cmd)
        self.returncode = returncode
        self.tail = tail
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        lines = "\n".join(f"  | {line}" for line in tail) or "  | (no output)"
        super().__init__(f"{' '.join(self.cmd[:3])} ... failed with {how}; last {len(tail)} log lines:\n{lines}")


def run_streaming(
    commands: Sequence[Sequence[str]],
    on_line: Callable[[str], None],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    term_grace_s: float = 20.0,
    tail_lines: int = TAIL_LINES,
    pass_fds: Sequence[int] = (),
    stop: threading.Event | None = None,
) -> None:
    """Run ``commands`` side by side, calling ``on_line`` (in this thread) for every line of their merged
    stdout/stderr; lines of the second and later commands are tagged ``[proc N]``.

    Raises ``Preempted`` if we received SIGTERM meanwhile, else ``ProcessFailed`` if any exited non-zero. When a
    Python SIGTERM handler is already installed (Prefect's), it keeps handling SIGTERM: whatever it raises stops the
    children first and then propagates. ``term_grace_s`` is how long SIGTERMed children get to exit before their
    groups are killed: the trainer's save on notice (train.preemption_grace_s).

    ``pass_fds`` are inherited by the children: a stage lock's descriptor, so that the lock stays held until the last
    child is gone, even if we are killed first. Setting ``stop`` kills every child at once (a lost stage lease:
    another run may start the stage any moment); the call then raises ``ProcessFailed``.
    """
    if not commands:
        raise ValueError("run_streaming needs at least one command")
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
    procs: list[subprocess.Popen[str]] = []
    family = Family(uuid.uuid4().hex)
    child_env = {**(os.environ if env is None else env), COOKIE_VAR: family.cookie}
    terminated = threading.Event()
    if (reason := notice.received()) is not None:
        raise Preempted(f"a spot notice came ({reason}) before the trainer started; it starts when retried")

    def forward_sigterm(*_: object) -> None:
        terminated.set()
        family.signal(signal.SIGTERM)

    try:
        with (handling_sigterm(forward_sigterm),
              notice.watch(forward_sigterm, term_grace_s, lambda: any(proc.poll() is None for proc in procs))):
            for index, cmd in enumerate(commands):
                proc = subprocess.Popen(
                    deathsig.command(os.getpid(), list(cmd)), cwd=cwd, env=child_env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True,
                    errors="replace", pass_fds=tuple(pass_fds),
                )
                procs.append(proc)
                threading.Thread(target=_pump, args=(index, proc, lines), daemon=True, name=f"pump-{proc.pid}").start()
            if terminated.is_set():
                family.signal(signal.SIGTERM)  # the notice came while children were starting: tell the late ones
            try:
                first_failed = _stream(procs, lines, on_line, tail, family, terminated, term_grace_s, stop)
            except BaseException:
                # The outer SIGTERM handler (or Ctrl-C) interrupted us: the children stop before it goes on.
                _terminate(family, procs, term_grace_s)
                raise
        codes = [proc.wait() for proc in procs]
        if terminated.is_set():
            raise Preempted(f"received a spot notice ({notice.received() or 'SIGTERM'}); the trainer stopped (exit "
                            f"{codes}) and resumes when retried")
        failed = [i for i, code in enumerate(codes) if code != 0]
        if failed:
            first = first_failed if first_failed is not None else failed[0]
            raise ProcessFailed(commands[first], codes[first], list(tail))
    finally:
        family.signal(signal.SIGKILL)
        family.wait_gone(KILL_WAIT_S)
        for proc in procs:
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _stream(
    procs: list[subprocess.Popen[str]],
    lines: queue.Queue[tuple[int, str | None]],
    on_line: Callable[[str], None],
    tail: collections.deque[str],
    family: Family,
    terminated: threading.Event,
    term_grace_s: float,
    stop: threading.Event | None = None,
) -> int | None:
    """Deliver lines until every child's output is closed; returns the index of the first child that failed."""
    open_streams = len(procs)
    first_failed: int | None = None  # the first to fail is the cause; the others usually went down with it
    deadlines: dict[str, float] = {}  # reason -> when everything left gets SIGKILL
    while open_streams:
        try:
            index, line = lines.get(timeout=0.5)
        except queue.Empty:
            index, line = -1, ""
        if line is None:
            open_streams -= 1
        elif line:
            tagged = line if index == 0 else f"[proc {index}] {line}"
            tail.append(tagged)
            on_line(tagged)
        now = time.monotonic()
        if first_failed is None:
            first_failed = next((i for i, proc in enumerate(procs) if proc.poll() not in (None, 0)), None)
        if terminated.is_set():
            deadlines.setdefault("preempted", now + term_grace_s)
        if first_failed is not None:
            deadlines.setdefault("peer failed", now + PEER_GRACE_S)
        if all(proc.poll() is not None for proc in procs):
            deadlines.setdefault("orphans", now + ORPHAN_GRACE_S)  # exited, yet a pipe is still held open
        if stop is not None and stop.is_set():
            deadlines.setdefault("stopped", now)
        if deadlines and now > min(deadlines.values()):
            family.signal(signal.SIGKILL)
    return first_failed


def _terminate(family: Family, procs: list[subprocess.Popen[str]], grace_s: float) -> None:
    """SIGTERM every marked process, give the children ``grace_s`` to exit (a trainer finishes its step and saves a
    checkpoint; torchrun stops its workers), then the caller's cleanup kills what is left."""
    family.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(proc.poll() is None for proc in procs):
        time.sleep(0.1)


def _pump(index: int, proc: subprocess.Popen[str], lines: queue.Queue[tuple[int, str | None]]) -> None:
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.put((index, line.rstrip("\r\n")))
    except ValueError:  # stdout closed under us during teardown
        pass
    lines.put((index, None))


@contextlib.contextmanager
def handling_sigterm(handler: Callable[[int, object], None]) -> Iterator[None]:
    """Handle SIGTERM with ``handler`` inside the block, unless SIGTERM is already handled in Python or this is not
    the main thread (only it may set handlers). An existing Python handler is the process-wide notice handler
    (finetune/notice.py), or Prefect's engine, which must stay in place: a `prefect flow-run execute` supervisor only
    hands a reschedule to an engine whose SIGTERM handler is Prefect's own. Callers then stop their children on the
    exception that handler raises."""
    if threading.current_thread() is not threading.main_thread() or callable(signal.getsignal(signal.SIGTERM)):
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Family:
    """The processes carrying a cookie in environment variable ``var``: the children and all their descendants,
    orphaned or not, since the environment is inherited."""

    def __init__(self, cookie: str, var: str = COOKIE_VAR) -> None:
        self.cookie, self.var = cookie, var
        self.seen: dict[int, psutil.Process] = {}
        """Every one ever found: an exiting process's environment can no longer be read, yet it must be waited for."""

    def signal(self, sig: signal.Signals) -> None:
        for process in self._live():
            try:
                process.send_signal(sig)  # psutil checks the pid still names the same process
            except psutil.Error:
                pass

    def wait_gone(self, timeout_s: float) -> None:
        """Signals land asynchronously: wait until each is gone (or a zombie for its new parent to reap), so that
        no descendant is still running when run_streaming returns."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_running(process) for process in self.seen.values()):
            time.sleep(0.02)

    def _live(self) -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            try:
                if process.pid != os.getpid() and process.environ().get(self.var) == self.cookie:
                    found.append(process)
            except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
                continue
        self.seen.update((process.pid, process) for process in found)
        return found


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
