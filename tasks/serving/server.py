"""Lifecycle of one inference server subprocess: start, wait for health, stop; never leave a process behind.

The server runs in its own session (process group) with its output in a log file. Stopping sends SIGTERM to the
group, waits a grace period, then SIGKILLs the group and any descendant that moved to a session of its own
(vLLM's engine and worker processes are children of the API server).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from finetune import deathsig

TAIL_LINES = 30


class ServerError(RuntimeError):
    """The server did not come up (or died). The message ends with its last log lines."""

    def __init__(self, message: str, log_path: Path, pgid: int | None = None):
        super().__init__(with_log_tail(message, log_path))
        self.log_path = log_path
        self.pgid = pgid


class ClientError(RuntimeError):
    """An external load generator (vllm bench serve) failed. The message ends with its last log lines."""


def with_log_tail(message: str, log_path: Path) -> str:
    tail = log_tail(log_path)
    lines = "\n".join(f"  | {line}" for line in tail) or "  | (no output)"
    return f"{message}\nlast {len(tail)} lines of {log_path}:\n{lines}"


def log_tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    if not path.is_file():
        return []
    # Progress bars rewrite one line with carriage returns: keep only what each line ended as.
    lines = [line.rsplit("\r", 1)[-1] for line in path.read_text(errors="replace").splitlines()]
    return [line for line in lines if line.strip()][-n:]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on ``port``. Connections of a server we just stopped (TIME_WAIT) do not count:
    the next server binds with SO_REUSEADDR, as uvicorn does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    startup_s: float = 0.0
    descendants: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def pgid(self) -> int:
        return self.proc.pid  # start_new_session makes the child its group's leader

    def remember_descendants(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.descendants.setdefault(child.pid, child)

    def wait_healthy(self, health_path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = self.base_url + health_path
        with httpx.Client(timeout=2.0) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise ServerError(f"server exited with code {code} before it became healthy", self.log_path,
                                      self.pgid)
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return
                self.remember_descendants()
                if time.monotonic() > deadline:
                    raise ServerError(f"server not healthy at {url} within {timeout_s:g} s "
                                      "(raise benchmark.startup_timeout_s if it is still loading)",
                                      self.log_path, self.pgid)
                time.sleep(0.5)

    def stop(self, grace_s: float = 30.0) -> None:
        self.remember_descendants()
        _signal_group(self.pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        # The leader may be gone while group members linger: kill whatever is left.
        _signal_group(self.pgid, signal.SIGKILL)
        for process in self.descendants.values():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if process.is_running():  # also guards against a reused pid
                    process.kill()
        self.proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@contextlib.contextmanager
def serving(cmd: Sequence[str], port: int, log_path: Path, *, health_path: str = "/health",
            startup_timeout_s: float = 900.0, env: Mapping[str, str] | None = None,
            grace_s: float = 30.0, pass_fds: Sequence[int] = ()) -> Iterator[Server]:
    """Start ``cmd`` (which must listen on 127.0.0.1:``port``), yield it once healthy, stop it on exit. ``pass_fds``:
    the stage key's lock (StageContext.lock_fds), held by the server until it exits: a server outliving its killed
    stage keeps its accelerator memory until then, and the key stays taken as long."""
    if port_in_use(port):
        # Checked first: a health probe would otherwise be answered by whatever already listens there
        # (often a server left over from an earlier crashed run), and we would benchmark the wrong model.
        raise ServerError(f"port {port} is already in use; stop what listens there or set benchmark.port: 0 "
                          "to pick a free port", log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(deathsig.command(os.getpid(), list(cmd)), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, pass_fds=tuple(pass_fds),
                                env=None if env is None else dict(env))
    server = Server(proc=proc, base_url=f"http://127.0.0.1:{port}", log_path=log_path)
    started = time.perf_counter()
    try:
        server.wait_healthy(health_path, startup_timeout_s)
        server.startup_s = time.perf_counter() - started
        yield server
    finally:
        server.stop(grace_s)


def run_client(cmd: Sequence[str], log_path: Path, timeout_s: float, env: Mapping[str, str] | None = None) -> None:
    """Run a client command to completion in its own process group, output to ``log_path``; kill it on timeout."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(deathsig.command(os.getpid(), list(cmd)), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=None if env is None else dict(env))
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ClientError(
            with_log_tail(f"{Path(cmd[0]).name} did not finish within {timeout_s:g} s", log_path)) from None
    finally:
        _signal_group(proc.pid, signal.SIGKILL)  # nothing it started may outlive it
        proc.wait()
    if code != 0:
        raise ClientError(with_log_tail(f"{' '.join(cmd[:3])} failed with exit code {code}", log_path))
