"""A stage key's lock on the Prefect server: one global concurrency limit per key, held with a lease.

The core's stage lock (finetune/stage_lock.py) takes the store's lock; through a real server (``PREFECT_API_URL``
set; the ephemeral API does not run the lease-expiry service) orchestration passes ``server_lock(lease_s)`` as well,
taken first. Work a stage hands to other machines (``train.launcher: prefect-pool`` node runs) gets the
``ServerLease`` and renews it while it runs (``renew_server_lease``), so the key stays taken while any node trains
even after the run that took it was killed; a node that cannot renew stops.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import get_current_settings

from finetune.stage_lock import LeaseLost, Reaper, ServerLease, ServerLock, Waiter

SERVER_LEASE_S = 120.0
"""A server lease's duration (the server accepts 60 s to a day): a killed holder's stage is free this long after its
last renewal (plus the server's ``repossessor.loop_seconds``, 15 s by default); a holder that cannot renew for half
of it stops its trainers."""


def server_lock(lease_s: float = SERVER_LEASE_S) -> ServerLock | None:
    """The server's lock of stage keys with leases of ``lease_s`` (retries.lock_lease_s), or None on the ephemeral
    API, which never revokes a dead holder's lease."""
    if not get_current_settings().api.url:
        return None

    def lock(stage: str, key: str, where: str, log: Callable[[str], None], wait: Waiter, lost: threading.Event,
             read_holder: Callable[[], dict[str, Any] | None],
             reap: Reaper) -> contextlib.AbstractContextManager[ServerLease]:
        return _server_limit(limit_name(stage, key), where, log, wait, lease_s, lost, read_holder, reap)

    return lock


def limit_name(stage: str, key: str) -> str:
    """The global concurrency limit of a stage key. Not tied to the store: two stores reached by different paths
    are told apart by nothing reliable, and two runs on truly different stores only wait for each other once."""
    return f"finetune-key-{stage}-{key[:16]}"


@contextlib.contextmanager
def _server_limit(name: str, where: str, log: Callable[[str], None], wait: Waiter, lease_s: float,
                  lost: threading.Event, read_holder: Callable[[], dict[str, Any] | None],
                  reap: Reaper) -> Iterator[ServerLease]:
    """Hold the one slot of the global concurrency limit ``name`` (created on demand, deleted after) with a lease.

    Built from the client calls ``prefect.concurrency.sync.concurrency(name, strict=True, lease_duration=...)`` makes,
    not from it: its acquisition waits without saying for whom and cannot be bounded while reporting; and it renews
    at 3/4 of the lease and, when renewal fails, cancels the calling thread after three attempts, possibly after the
    server already gave the slot away and without stopping the trainers (child processes). Here renewal runs every
    quarter of the lease (``_renewing``), and half a lease without one sets ``lost``.
    """
    lease_id: UUID | None = None
    last_holder: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        def attempt() -> dict[str, Any] | None:
            nonlocal lease_id
            for _ in range(2):
                try:
                    response = client.increment_concurrency_slots_with_lease(
                        names=[name], slots=1, mode="concurrency", lease_duration=lease_s, holder=_flow_run_holder())
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code != 423:  # 423 Locked: the one slot is taken
                        raise
                    if _reap(client, name, reap, where, log):
                        continue
                    last_holder.update(read_holder() or {})  # empty while the holder takes or leaves the store lock
                    return dict(last_holder)
                granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
                if granted.limits:
                    lease_id = granted.lease_id
                    return None
                # No such limit (strict: never run without it): create it. Not before every increment: the server
                # logs each refused duplicate with a traceback.
                with contextlib.suppress(ObjectAlreadyExists):
                    client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            return dict(last_holder)  # deleted again by a run that took and finished it meanwhile: next poll

        wait(attempt)
        assert lease_id is not None
        server = ServerLease(name=name, lease_id=str(lease_id), lease_s=lease_s,
                             describe=f"Prefect global concurrency limit {name} on {get_current_settings().api.url} "
                                      f"(lease {lease_s:g} s)")
        try:
            with _renewing(server, where, log, lost):
                yield server
        finally:
            _release_limit(client, name, lease_id, lease_s, lost, where, log)


@contextlib.contextmanager
def renew_server_lease(server: ServerLease, where: str, log: Callable[[str], None]) -> Iterator[threading.Event]:
    """Keep another process's server lease alive while the block runs (a pool node run's trainer) and yield the
    event set when it is lost (revoked, or not renewed for half a lease): the block must stop its work then, as the
    holder would. Renewed once up front, so work never starts on a lease that is already gone. Never released here:
    the run that took it releases it, or, if that run is dead, it expires ``lease_s`` after the last renewal."""
    lost = threading.Event()
    with get_client(sync_client=True) as client:
        try:
            client.renew_concurrency_lease(UUID(server.lease_id), lease_duration=server.lease_s)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code not in (404, 410):
                raise
            raise LeaseLost(f"{where}: the lease on {server.name} is gone (the run that took it released it, or "
                            "it expired): not starting") from exc
    with _renewing(server, where, log, lost):
        yield lost


@contextlib.contextmanager
def _renewing(server: ServerLease, where: str, log: Callable[[str], None], lost: threading.Event) -> Iterator[None]:
    """Renew ``server`` every quarter of its lease while the block runs; set ``lost`` when the server revoked it or
    half a lease passed without a renewal, well before the server's lease-expiry service (``repossessor``) can free
    the slot for another run."""
    name, lease_id, lease_s = server.name, UUID(server.lease_id), server.lease_s
    done = threading.Event()
    renewed = time.monotonic()

    def renew() -> None:
        nonlocal renewed
        failing = False
        with get_client(sync_client=True) as renewer:
            while not done.wait(min(5.0, lease_s / 8) if failing else lease_s / 4):
                try:
                    renewer.renew_concurrency_lease(lease_id, lease_duration=lease_s)
                    renewed, failing = time.monotonic(), False
                except httpx.HTTPStatusError as exc:
                    if exc.response.status_code in (404, 410):  # revoked: another run may hold it already
                        log(f"{where}: the server revoked our lease on {name}; stopping")
                        lost.set()
                        return
                    log(f"{where}: renewing the lease on {name} failed ({exc}); retrying")
                    failing = True
                except httpx.HTTPError as exc:  # the server unreachable: retried until the watchdog gives up
                    log(f"{where}: renewing the lease on {name} failed ({exc}); retrying")
                    failing = True

    def watchdog() -> None:  # apart from renew(): a request hanging in its own timeout must not delay this
        while not done.wait(1.0) and not lost.is_set():
            if time.monotonic() - renewed > lease_s / 2:
                log(f"{where}: could not renew the lease on {name} for {lease_s / 2:g} s; stopping")
                lost.set()

    threads = [threading.Thread(target=target, daemon=True, name=f"{target.__name__}-{where}")
               for target in (renew, watchdog)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=2)


def _reap(client: SyncPrefectClient, name: str, reap: Reaper, where: str, log: Callable[[str], None]) -> bool:
    """Release the lease of a holder the store's lock proves dead (finetune/stage_lock.py ``_reap_dead_holder``);
    True when released. A server that fails the release leaves the lease to expire."""
    try:
        dead = reap(lambda lease_id: client.release_concurrency_slots_with_lease(UUID(lease_id)))
    except httpx.HTTPError as exc:
        log(f"{where}: could not release the lease a dead holder left on {name} ({exc}); waiting for it to expire")
        return False
    if dead is None:
        return False
    log(f"{where}: {dead} died holding {name} (its process is gone and no process holds the store's lock); "
        "released its server lease")
    return True


def _release_limit(client: SyncPrefectClient, name: str, lease_id: UUID, lease_s: float, lost: threading.Event,
                   where: str, log: Callable[[str], None]) -> None:
    """Delete the limit, then release our slot. Deleted while we still hold its one slot, proven by renewing the
    lease first: nobody else can hold it then, and a waiter just finds it gone and creates it again. Deleted after
    the release instead, a waiter could take the freed slot and lose its limit under it, and a third run create a
    new one and compute beside it. A lost lease leaves the limit to whoever holds it now."""
    try:
        if not lost.is_set():
            client.renew_concurrency_lease(lease_id, lease_duration=lease_s)
            with contextlib.suppress(ObjectNotFound):
                client.delete_global_concurrency_limit_by_name(name)
        client.release_concurrency_slots_with_lease(lease_id)
    except httpx.HTTPError as exc:  # a leftover limit is reused by the next run; a leftover slot expires with its lease
        log(f"{where}: could not release {name} ({exc}); its lease expires by itself")


def _flow_run_holder() -> ConcurrencyLeaseHolder | None:
    """The flow run taking the slot, which the server records with the lease."""
    context = FlowRunContext.get()
    return ConcurrencyLeaseHolder(type="flow_run", id=context.flow_run.id) if context and context.flow_run else None
