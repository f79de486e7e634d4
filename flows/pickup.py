"""Bounded waits for flow runs submitted to a work pool: a run no worker takes within the bound fails the wait, named
with its pool and how to start a worker, instead of sitting in Scheduled/Late for ever (flows/dispatch.py for GPU
stages, flows/node_runs.py for training nodes)."""

from __future__ import annotations

import time

from finetune.profile import Profile
from finetune.stage import PermanentError
from flows.pool_workers import start_hint

PICKUP_S = 600.0
"""How long a submitted run may wait for a worker beyond deploy.wait_for_workers_s (a GPU pod's image pull and a
node's scale-up take minutes; the preflight already saw a ready worker)."""
WAITING = {"SCHEDULED", "PENDING"}
"""State types of a run no worker has started (Late and AwaitingRetry are SCHEDULED)."""


class NotPickedUp(PermanentError):
    pass


def pickup_bound_s(profile: Profile) -> float:
    return PICKUP_S + profile.deploy.wait_for_workers_s


class PickupWatch:
    """Raise NotPickedUp once a run has been waiting for a worker longer than ``bound_s`` (counted again each time it
    goes back to waiting, as a rescheduled node does)."""

    def __init__(self, pool: str, bound_s: float):
        self.pool, self.bound_s = pool, bound_s
        self.since: dict[object, float] = {}

    def check(self, run_id: object, state_type: str, state_name: str, what: str) -> None:
        if state_type not in WAITING:
            self.since.pop(run_id, None)
            return
        waited = time.monotonic() - self.since.setdefault(run_id, time.monotonic())
        if waited > self.bound_s:
            raise NotPickedUp(f"{what} waited {waited:.0f} s in {state_name} and no worker of pool {self.pool} took "
                              f"it: {start_hint(self.pool)}, or raise deploy.wait_for_workers_s")


RESCHEDULE_GRACE_S = 60.0
"""How long a Crashed run is given to be rescheduled by the finetune-reschedule-crashed automation before the run
waiting for it counts it as failed."""


class CrashGrace:
    """Whether a waited-for run has ended badly: Failed or Cancelled at once, Crashed only once it stayed so past
    RESCHEDULE_GRACE_S (a lost worker's run comes back as Scheduled within seconds when deployments/automations.yaml
    is installed)."""

    def __init__(self, grace_s: float = RESCHEDULE_GRACE_S):
        self.grace_s = grace_s
        self.since: dict[object, float] = {}

    def ended_badly(self, run_id: object, state_type: str) -> bool:
        if state_type != "CRASHED":
            self.since.pop(run_id, None)
            return state_type in ("FAILED", "CANCELLED", "CANCELLING")
        return time.monotonic() - self.since.setdefault(run_id, time.monotonic()) > self.grace_s
