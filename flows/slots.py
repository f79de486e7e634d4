"""How many stages of one pipeline run work at once in each work pool: a Prefect global concurrency limit per pool,
visible in the UI while the run lasts.

Stages that run in the flow's own process share its machine (2 CPU cores for the embedded default, one GPU node for
a direct run of a production profile): by default one at a time there. Stages dispatched to the GPU pool each get a
pod of their own, so that pool is unbounded unless ``deploy.stage_concurrency`` says otherwise.

The limits belong to one flow run (the name carries a fresh id) and are deleted when it ends. A run killed with
kill -9 leaves its limits behind, but nothing else waits on them: a limit shared across runs would need the server's
lease-expiry service to free a dead holder's slot, which an ephemeral API does not run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from finetune.profile import Profile


def default_limit(profile: Profile, pool: str) -> int | None:
    if pool in profile.deploy.stage_concurrency:
        return profile.deploy.stage_concurrency[pool]
    return 1 if pool == profile.deploy.work_pool else None


@contextmanager
def stage_slots(profile: Profile, pools: set[str]) -> Iterator[dict[str, str | None]]:
    """Pool -> name of this run's concurrency limit for it (None: unbounded), deleted on exit."""
    run_id = uuid.uuid4().hex[:8]
    names: dict[str, str | None] = {}
    with get_client(sync_client=True) as client:
        try:
            for pool in sorted(pools):
                limit = default_limit(profile, pool)
                if limit is None:
                    names[pool] = None
                    continue
                names[pool] = f"finetune-{run_id}-stages-{pool}"
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=names[pool], limit=limit))
            yield names
        finally:
            for name in filter(None, names.values()):
                client.delete_global_concurrency_limit_by_name(name)
