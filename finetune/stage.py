"""What a pipeline stage is, how its key is computed, and how it runs against the store (no Prefect here).

A stage's key hashes its code version, the slice of the profile that shapes its output, a fingerprint of any outside
content it reads (data files, a hub revision) and the keys of the artifacts it consumes. Two runs with equal keys
produce interchangeable outputs, so a finished artifact under that key is reused instead of recomputed.
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.hashing import hash_json
from finetune.profile import Profile
from finetune.stage_lock import Lease, LeaseLost, LockTimeout, ServerLease, ServerLock, identity, stage_lock
from finetune.store import Artifact, Store, atomic_file, now_iso

TABLES_FILE = "tables.json"

log = logging.getLogger(__name__)


class PermanentError(RuntimeError):
    """Bad input or configuration: retrying cannot help, so the stage fails at once."""


class Preempted(RuntimeError):
    """The machine is being taken away (SIGTERM from a spot reclaim); the stage resumes when retried."""


@dataclass
class StageContext:
    profile: Profile
    key: str
    workdir: Path
    inputs: dict[str, Artifact]
    log: Callable[[str], None] = log.info
    progress: Callable[[float, str], None] = lambda fraction, message: None
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Tables the stage wants shown in the UI (name -> rows); the flow posts them as artifacts."""
    lock_fds: tuple[int, ...] = ()
    """Descriptors the stage's child processes inherit: they keep the stage key locked until the last one exits."""
    stop: threading.Event | None = None
    """Set when the stage lost its lock (a remote store's lease): its child processes must stop at once."""
    server_lease: ServerLease | None = None
    """The key's server lease, which work the stage hands to other machines renews (flows/node_runs.py)."""


@dataclass(frozen=True)
class StageSpec:
    name: str
    version: str
    """Bump when the stage's output for the same inputs changes."""
    run: Callable[[StageContext], dict[str, Any]]
    """Does the work into ctx.workdir and returns the metrics to record."""
    config: Callable[[Profile], dict[str, Any]]
    """The part of the profile that shapes this stage's output."""
    upstream: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    """Input slots read when the run has them: the pipeline leaves out steps a profile does not run (a benchmark of
    weights it does not serve), and a reader of every step (publish) reports what there is."""
    fingerprint: Callable[[Profile], dict[str, Any]] = lambda profile: {}
    """Identity of outside content the stage reads (data hashes, hub revisions)."""
    resumable: bool = False
    """Keep an interrupted attempt's files (checkpoints) instead of starting clean."""
    skipped: Callable[[Profile], str | None] = lambda profile: None
    """Why this profile does not run the stage at all (e.g. publish without a target); None: it runs."""
    elsewhere: Callable[[Profile], bool] = lambda profile: False
    """Whether the stage starts processes on other machines (train's multi-node launchers): those hold no store
    lock, so a holder found dead (finetune/stage_lock.py) may still have them running."""
    still_valid: Callable[[Artifact], bool] = lambda artifact: True
    """For a stage whose effect lies outside the store (publish): whether the outside world still holds what the
    finished artifact recorded. When it does not, the artifact is set aside and the stage runs again."""


def deferred(module: str) -> Callable[[StageContext], dict[str, Any]]:
    """``module.run``, imported on the first call: a stage whose work needs torch keeps it out of a cached rerun,
    which only computes keys and verifies artifacts."""
    def run(ctx: StageContext) -> dict[str, Any]:
        return importlib.import_module(module).run(ctx)

    return run


def stage_key(spec: StageSpec, profile: Profile, inputs: dict[str, Artifact]) -> str:
    missing = set(spec.upstream) - set(inputs)
    if missing:
        raise ValueError(f"stage {spec.name} needs the artifacts of {sorted(missing)}")
    return hash_json({
        "stage": spec.name,
        "version": spec.version,
        "config": spec.config(profile),
        "fingerprint": spec.fingerprint(profile),
        "inputs": input_keys(spec, inputs),
    })


def input_keys(spec: StageSpec, inputs: dict[str, Artifact]) -> dict[str, str]:
    """Slot -> key of every input the stage reads: its upstream slots and the optional ones the run has."""
    return {name: inputs[name].key for name in (*spec.upstream, *spec.optional) if name in inputs}


def execute_stage(
    spec: StageSpec,
    profile: Profile,
    store: Store,
    inputs: dict[str, Artifact],
    key: str | None = None,
    log_fn: Callable[[str], None] = log.info,
    progress: Callable[[float, str], None] = lambda fraction, message: None,
    run: str = "",
    server_lock: ServerLock | None = None,
) -> tuple[Artifact, dict[str, list[dict[str, Any]]]]:
    """Run one stage unless a verified artifact with its key exists. Returns the artifact and the UI tables.

    Only the holder of the key's lock computes (finetune/stage_lock.py): while another run (``run`` names this one
    in what the other logs) computes the key, this call waits up to ``retries.lock_timeout_s`` and then returns that
    run's artifact, or computes the stage itself if that run failed. ``artifact.timings["computed_by"]`` says who
    computed it (``stage_lock.identity(run)``). Orchestration passes its ``server_lock`` (flows/server_lease.py)."""
    key = key or stage_key(spec, profile, inputs)
    existing = store.verified_artifact(spec.name, key)
    if existing is not None:
        return existing, read_tables(store.materialize(existing, [TABLES_FILE]))
    owner = identity(run)
    try:
        with stage_lock(store, spec.name, key, owner=owner, timeout_s=profile.retries.lock_timeout_s, log=log_fn,
                        progress=progress, server_lock=server_lock, elsewhere=spec.elsewhere(profile)) as lease:
            existing = store.verified_artifact(spec.name, key)
            if existing is not None:  # the run we waited for finished it
                log_fn(f"{spec.name} {key[:12]}: taking the artifact "
                       f"{existing.timings.get('computed_by', 'another run')} computed as a cache hit")
                return existing, read_tables(store.materialize(existing, [TABLES_FILE]))
            return _compute(spec, profile, store, inputs, key, log_fn, progress, lease, owner)
    except LockTimeout as exc:
        raise PermanentError(str(exc)) from exc


def _compute(
    spec: StageSpec, profile: Profile, store: Store, inputs: dict[str, Artifact], key: str,
    log_fn: Callable[[str], None], progress: Callable[[float, str], None], lease: Lease, owner: str,
) -> tuple[Artifact, dict[str, list[dict[str, Any]]]]:
    """Compute the stage into its working directory and finish its artifact (the caller holds the key's lock)."""
    for artifact in inputs.values():
        store.materialize(artifact)  # a remote store's inputs reach this machine only when a stage reads them
    workdir = store.prepare(spec.name, key, keep_partial=spec.resumable)
    # Written below, after run(): one already here was left by an attempt killed before its manifest.
    (workdir / TABLES_FILE).unlink(missing_ok=True)
    ctx = StageContext(profile=profile, key=key, workdir=workdir, inputs=inputs, log=log_fn, progress=progress,
                       lock_fds=lease.fds, stop=lease.lost, server_lease=lease.server)
    started, clock = now_iso(), time.perf_counter()
    lost = LeaseLost(f"{spec.name} {key[:12]}: lost the lock of this stage key; stopped, retried later")
    try:
        metrics = spec.run(ctx)
    except Exception as exc:
        if lease.lost.is_set():  # whatever the stage raised, the cause is the lost lease
            raise lost from exc
        raise
    if lease.lost.is_set():  # its output may already be another run's to write: never finish it
        raise lost
    # Tables travel inside the artifact so a cache hit can show them in the UI again.
    with atomic_file(workdir / TABLES_FILE, "w") as handle:
        json.dump(ctx.tables, handle, indent=1, default=str)
    artifact = Artifact(
        stage=spec.name, key=key, path=str(workdir),
        inputs=input_keys(spec, inputs),
        config={"version": spec.version, "profile": spec.config(profile), "fingerprint": spec.fingerprint(profile)},
        metrics=metrics,
        timings={"started": started, "finished": now_iso(), "seconds": round(time.perf_counter() - clock, 3),
                 "computed_by": owner},
    )
    return store.finish(artifact), ctx.tables


def read_tables(artifact: Artifact) -> dict[str, list[dict[str, Any]]]:
    path = Path(artifact.path) / TABLES_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
