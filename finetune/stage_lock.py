"""One computation per stage key across runs: a run that needs a stage key another run is computing waits for it.

Two runs of one profile on one store (a schedule firing during a manual run, a retry while a lost worker still runs
the old attempt) would otherwise both compute every uncached stage in the same directory: two trainers writing one
checkpoint directory. So a stage computes only while it holds the key's lock, ``<store>/.locks/<stage>/<key>.*``;
whoever waited finds the finished artifact afterwards and takes it as a cache hit, or computes it if that run failed.

What Prefect 3.8 offers was not enough on its own: ``FileSystemLockManager`` locks never expire (a holder killed with
kill -9 blocks every later run), ``MemoryLockManager`` is one process's, and a global concurrency limit's lease is
revoked by a server service that the ephemeral API does not run. The lock lives with the store instead, which every
run sharing artifacts shares anyway:

- **Local store** (a directory, also a shared volume): ``fcntl.flock`` on ``<key>.lock``. The kernel releases it when
  the last process holding it dies, however it dies, so a dead holder never blocks anyone. The trainers inherit the
  descriptor (``StageContext.lock_fds``), so the lock stays held until the last process that could still write the
  stage directory is gone (a trainer saving its checkpoint after its engine was killed). While its holder lives the
  lock cannot be lost. A frozen holder (SIGSTOP, a paused container) would hold it forever: once the server gave
  the key to a waiter (the frozen one stopped renewing its lease), the waiter kills the holder's stopped processes
  on this host (``_fence_frozen_holders``). (On NFS, flock needs a v4 mount or a lock manager.)
- **Remote store** (fsspec URL): a lease file ``<key>.lease`` that its holder renews every ``ttl/4``; a lease not renewed
  for ``ttl`` is free. A holder that cannot renew for ``ttl/2``, or finds another run's token there, sets
  ``Lease.lost``: the stage kills its trainers at once (``run_streaming``'s ``stop``), well before anyone else may take
  over, and fails with ``LeaseLost`` (retried). Object stores have no compare-and-swap, so two runs that find the lease
  free at the same moment both write it; each reads it back after ``settle_s`` and only the one whose write landed
  last goes on. It relies on the machines' clocks agreeing to well within ``ttl`` (NTP).

The lock file holds who holds it (run, pid, host, since), which the waiting run logs and shows as its progress.

- **Through a Prefect server**, the caller (orchestration: flows/server_lease.py) passes a ``ServerLock``: a global
  concurrency limit is taken first, then the store's lock above as well. Both hold for the block; losing either stops
  the trainers. The server lock serializes runs on different machines that reach the store by different paths or
  through an object store without compare-and-swap; the store lock still guards against a run that does not use the
  server (``finetune run`` with the ephemeral API on the same store) and, on a local store, keeps the key locked
  while a killed run's trainer is still saving (the server's lease expires after its duration whether or not that
  trainer is gone). A holder killed outright (kill -9, or Prefect's runner killing an engine that did not
  acknowledge a reschedule in time) cannot release its server lease, which would keep the key from everyone, its own
  rescheduled attempt included, for a whole lease. On a local store a waiter on the same host can prove it dead: the
  lock file names its host, pid and server lease, its pid is gone and no process holds the lock (the kernel dropped
  the flock with the last of its processes, trainers included). The waiter then takes the lock without waiting,
  releases that server lease and clears the file, so one waiter does it (``reap``). Never for a holder on another
  host (flock over a shared volume may not see its locks: NFSv3 without a lock manager) nor one whose stage starts
  processes on other machines (``elsewhere``: multi-node launchers): those wait out the lease. This module imports
  no Prefect: the core takes its locks from its caller.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from finetune.store import Store, now_iso

LOCKS_DIR = ".locks"
POLL_S = 1.0
LEASE_TTL_S = 60.0
SETTLE_S = 2.0


Waiter = Callable[[Callable[[], "dict[str, Any] | None"]], None]
"""Calls an attempt to take a lock until it succeeds (returns None) or the wait times out; see ``_wait``."""


Reaper = Callable[[Callable[[str], None]], "str | None"]
"""Given how to release a server lease by its id, release the one a holder that died left on the key (see
``_reap_dead_holder``); returns that holder's name, or None when there is none to prove dead."""


class ServerLock(Protocol):
    """Takes a stage key's lock on an orchestration server (flows/server_lease.py) for the block: waits through
    ``wait`` (bounded and reported like the store's lock), sets ``lost`` when the server lease cannot be kept, asks
    ``read_holder`` whom it waits for, and ``reap`` to free the lease of a holder proven dead."""

    def __call__(self, stage: str, key: str, where: str, log: Callable[[str], None], wait: Waiter,
                 lost: threading.Event, read_holder: Callable[[], dict[str, Any] | None], reap: Reaper,
                 ) -> contextlib.AbstractContextManager[ServerLease]: ...


class LockTimeout(TimeoutError):
    """Waited ``retries.lock_timeout_s`` for another run computing the same stage key (the stage fails for good:
    finetune.stage raises it as a PermanentError)."""


class LeaseLost(RuntimeError):
    """This run's lease on a stage key could not be renewed: its trainers were stopped before anyone else starts."""


@dataclass(frozen=True)
class ServerLease:
    """A server lease on a stage key's limit, as a stage hands it to processes on other machines that compute for it
    (pool node runs, flows/node_runs.py): they renew it while they work (flows/server_lease.py
    ``renew_server_lease``), so the key stays taken as long as any of them lives, even when the run that took it was
    killed."""

    name: str
    lease_id: str
    lease_s: float
    describe: str = ""
    """What holds it, as the stage's log says (the limit and the server)."""


@dataclass
class Lease:
    """A held stage lock: descriptors the stage's children must inherit, the event set when it is lost, and the
    server lease when one is held."""

    fds: tuple[int, ...] = ()
    lost: threading.Event = field(default_factory=threading.Event)
    server: ServerLease | None = None


def identity(run: str = "") -> str:
    """Who computes a stage: the run (a Prefect flow run's name and id, when there is one), pid and host."""
    return f"{run + ' ' if run else ''}(pid {os.getpid()} on {socket.gethostname()})"


@contextlib.contextmanager
def stage_lock(
    store: Store, stage: str, key: str, *, owner: str, timeout_s: float | None,
    log: Callable[[str], None], progress: Callable[[float, str], None],
    poll_s: float = POLL_S, ttl_s: float = LEASE_TTL_S, settle_s: float = SETTLE_S,
    server_lock: ServerLock | None = None, elsewhere: bool = False,
) -> Iterator[Lease]:
    """Hold the lock of ``<stage>/<key>`` for the block, waiting up to ``timeout_s`` (None: as long as it takes);
    with ``server_lock``, the server's first. ``elsewhere``: the block starts processes on other machines, which
    do not hold the store's lock (see the module's docstring)."""
    holder: dict[str, Any] = {"owner": owner, "since": now_iso(), "host": socket.gethostname(), "pid": os.getpid(),
                              "elsewhere": elsewhere}
    where = f"{stage} {key[:12]}"
    lost = threading.Event()
    started = time.monotonic()
    path = f"{store.root}/{LOCKS_DIR}/{stage}/{key}.{'lock' if store.is_local else 'lease'}"

    def read_holder() -> dict[str, Any] | None:  # whoever holds the store's lock wrote itself into the file
        return _read_lease(store, path)

    def reap(release: Callable[[str], None]) -> str | None:
        # A lease file's holder may be on any host, alive: its server lease expires instead.
        return _reap_dead_holder(Path(path), release) if store.is_local else None

    def wait(attempt: Callable[[], dict[str, Any] | None]) -> None:  # one bound for the server's and the store's
        _wait(attempt, where, timeout_s, log, progress, poll_s, started)

    def store_lock(fence: bool) -> contextlib.AbstractContextManager[Lease]:
        if store.is_local:
            return _flock(Path(path), holder, wait, lost, (lambda line: log(f"{where}: {line}")) if fence else None)
        return _lease_file(store, path, holder, where, log, wait, ttl_s, settle_s, lost)

    backend = f"flock on {path}" if store.is_local else f"lease file {path} (ttl {ttl_s:g} s)"
    with contextlib.ExitStack() as stack:
        server = None
        if server_lock is not None:
            server = stack.enter_context(server_lock(stage, key, where, log, wait, lost, read_holder, reap))
            backend = f"{server.describe}, and {backend}"
            holder["server_lease"] = server.lease_id  # for a waiter to release once we are found dead
        lease = stack.enter_context(store_lock(fence=server is not None))
        lease.server = server
        log(f"{where}: computing under {backend}")
        yield lease


def _wait(attempt: Callable[[], dict[str, Any] | None], where: str, timeout_s: float | None,
          log: Callable[[str], None], progress: Callable[[float, str], None], poll_s: float, started: float) -> None:
    """Call ``attempt`` until it returns None (acquired); meanwhile say whom we wait for, and since when.
    ``timeout_s`` counts from ``started`` (monotonic), the start of the whole ``stage_lock`` wait."""
    announced = None
    while (holder := attempt()) is not None:
        text = f"{holder.get('owner') or 'another run'} since {holder.get('since') or '?'}"
        if text != announced:
            log(f"{where}: {text} is computing this stage; waiting for it (its artifact is then a cache hit)")
            progress(0.0, f"waiting for {text}")
            announced = text
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise LockTimeout(f"{where}: waited {timeout_s:g} s for {text} to finish this stage "
                              "(retries.lock_timeout_s); raise it, or stop that run")
        time.sleep(poll_s)
    if announced is not None:
        log(f"{where}: the run we waited for is done, after {time.monotonic() - started:.1f} s")


@contextlib.contextmanager
def _flock(path: Path, holder: dict[str, Any], wait: Waiter, lost: threading.Event,
           fence: Callable[[str], None] | None = None) -> Iterator[Lease]:
    """``fence``: we hold the key's server lease, so the server revoked the last holder's; its processes on this host
    that still hold the lock are frozen: kill them (logging through ``fence``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Never deleted: a waiter holding the old file open would lock a name nobody else uses any more.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        def attempt() -> dict[str, Any] | None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if fence is not None:
                    _fence_frozen_holders(path, fence)
                return _read_json(path.read_bytes()) or {}
            return None

        wait(attempt)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield Lease(fds=(fd,), lost=lost)
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock once the children that inherited it are gone too


def _fence_frozen_holders(path: Path, log: Callable[[str], None]) -> None:
    """Kill the stopped processes of this host (SIGSTOP, a frozen container) that hold ``path`` open: a run that lost
    its server lease stops its own trainers within half a lease, so holders still there once the server gave the key
    to us are frozen, and would hold the lock for as long as nobody kills them. Running ones are left alone: a killed
    run's trainer saving on its notice (waited for), and other runs waiting for the lock like us."""
    frozen = []
    for process in psutil.process_iter():
        try:
            if (process.pid != os.getpid() and _status(process) in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
                    and any(Path(f.path) == path for f in process.open_files())):
                frozen.append(process)
        except (psutil.Error, OSError):  # gone, or not ours to read
            continue
    if not frozen:
        return
    log(f"the holder of {path.name} lost its server lease and is frozen: killing its stopped process(es) "
        f"{', '.join(str(p.pid) for p in frozen)} that hold the lock")
    for process in frozen:
        with contextlib.suppress(psutil.Error):
            process.kill()  # SIGKILL ends a stopped process too; the kernel drops the lock with its last holder


def _status(process: psutil.Process) -> str:
    try:
        return process.status()
    except psutil.Error:
        return ""


@contextlib.contextmanager
def _lease_file(store: Store, path: str, holder: dict[str, Any], where: str, log: Callable[[str], None],
                wait: Waiter, ttl_s: float, settle_s: float, lost: threading.Event) -> Iterator[Lease]:
    fs = store.fs
    token = uuid.uuid4().hex

    def read() -> dict[str, Any] | None:
        return _read_lease(store, path)

    def write() -> None:
        with fs.open(path, "wb") as handle:
            handle.write(json.dumps(holder | {"token": token, "renewed": time.time(), "ttl_s": ttl_s}).encode())

    def attempt() -> dict[str, Any] | None:
        current = read()
        if current and current.get("token") != token and _lease_current(current, ttl_s):
            return current
        write()
        time.sleep(settle_s)  # a run that found it free at the same moment writes within this; the last write wins
        mine = read()
        return None if mine and mine.get("token") == token else (mine or {})

    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    wait(attempt)
    lease = Lease(lost=lost)
    done = threading.Event()

    def renew() -> None:
        renewed = time.monotonic()
        while not done.wait(ttl_s / 4):
            try:
                current = read()
                if not current or current.get("token") != token:
                    log(f"{where}: lost the lease to {(current or {}).get('owner') or 'nobody'}; stopping")
                    lease.lost.set()
                    return
                write()
                renewed = time.monotonic()
            except Exception as exc:  # a store hiccup: only a lease at risk of expiring is given up
                if time.monotonic() - renewed > ttl_s / 2:
                    log(f"{where}: could not renew the lease for {ttl_s / 2:g} s ({exc}); stopping")
                    lease.lost.set()
                    return

    thread = threading.Thread(target=renew, daemon=True, name=f"lease-{where}")
    thread.start()
    try:
        yield lease
    finally:
        done.set()
        thread.join()
        with contextlib.suppress(Exception):
            if (read() or {}).get("token") == token:
                fs.rm(path)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` ended (a zombie has: only its exit status waits for its parent)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # not ours to read: alive for all we know
        return False


def _lease_current(lease: dict[str, Any], ttl_s: float) -> bool:
    """Whether a lease file's holder renewed it within its ttl."""
    return time.time() - lease.get("renewed", 0) < lease.get("ttl_s", ttl_s)


def _reap_dead_holder(path: Path, release: Callable[[str], None]) -> str | None:
    """If the lock file names a holder on this host whose process is gone, that held a server lease and whose stage
    ran here only, and no process holds the lock (its trainers gone too): release that lease and clear the file, under
    the lock (taken without waiting, so exactly one waiter does it). Returns the dead holder's name, else None."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (alive, or a trainer still saving), or a mount without flock: nothing proven
            return None
        dead = _read_json(os.pread(fd, 1 << 16, 0)) or {}
        if (not dead.get("server_lease") or dead.get("elsewhere", True) or dead.get("host") != socket.gethostname()
                or not isinstance(dead.get("pid"), int) or not _gone(dead["pid"])):
            return None  # nobody's, a holder elsewhere, or a pid alive (maybe reused): its lease expires by itself
        release(dead["server_lease"])
        os.ftruncate(fd, 0)
        return str(dead.get("owner") or "the last holder")
    finally:
        os.close(fd)  # drops our lock


def _read_lease(store: Store, path: str) -> dict[str, Any] | None:
    try:
        with store.fs.open(path, "rb") as handle:
            return _read_json(handle.read())
    except FileNotFoundError:
        return None


def _read_json(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # being written, or empty between holders
    return value if isinstance(value, dict) else None
