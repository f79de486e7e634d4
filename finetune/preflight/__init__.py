"""Preflight: what would stop this run, found before anything is downloaded or rented, one line each with what to do.

The ``finetune`` flow runs it as its first task (after the plan, before the download) and ``finetune preflight
--profile P`` runs it alone. Checks, each in its own module:
- data.py: no shipped placeholder left (data.source, image names), each data source exists and its fsspec driver is
  installed (extras s3, gcs, azure);
- hub.py: the hub is reachable, HF_TOKEN can read the (gated) repo, the revision exists; the file list sizes the
  download;
- store_room.py: the store is writable and has room for the download and the stages after it (sizes from the plan);
- the work pools: every GPU work pool the run submits to exists and has a ready worker (deploy.wait_for_workers_s
  waits). That check asks the Prefect server: orchestration passes it in (flows/pool_workers.py ``check_pools``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from finetune.preflight.data import check_data, placeholders
from finetune.preflight.store_room import check_store_room
from finetune.profile import Profile
from finetune.stage import PermanentError
from finetune.store import Store

W4A16_SHARE = 0.3
"""Size of a W4A16 checkpoint against bf16 (4-bit weights, bf16 scales, unquantized embeddings and lm_head)."""


class PreflightFailed(PermanentError):
    """Every problem found, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("preflight: " + "\n".join(problems) if len(problems) == 1 else
                         f"preflight found {len(problems)} problems:\n" + "\n".join(problems))


def pools_used(profile: Profile, stages: Iterable[str]) -> list[str]:
    """The GPU pools a deployed run of these stages submits flow runs to (flows/dispatch.py, flows/node_runs.py)."""
    stages = set(stages)
    deploy = profile.deploy
    dispatched = bool(stages & set(deploy.gpu_stages)) and deploy.gpu_work_pool != deploy.work_pool
    nodes = "train" in stages and profile.train.launcher == "prefect-pool"
    return [deploy.gpu_work_pool] if dispatched or nodes else []


def written_bytes(profile: Profile, stages: Iterable[str], download_bytes: int, planned: dict[str, Any]) -> int:
    """About what the stages write to the store: the download, the checkpoints kept (plus the one being written), a
    bf16 model as large as the base, and its 4-bit copy."""
    stages = set(stages)
    total = download_bytes if "download" in stages else 0
    if "train" in stages:
        checkpoint = planned.get("checkpoint", {})
        total += int(checkpoint.get("bytes_per_save", 0)) * (int(checkpoint.get("keep_last", 1)) + 1)
    if "convert" in stages:
        total += download_bytes
    if "quantize" in stages:
        total += int(download_bytes * W4A16_SHARE)
    return total


PoolCheck = Callable[[list[str], float, Callable[[str], None]], list[str]]
"""(pools, seconds to wait for a worker, log) -> one line per pool without a ready worker."""


def preflight(profile: Profile, store: Store, stages: Iterable[str], planned: dict[str, Any], pools: list[str],
              check_pools: PoolCheck | None = None, log: Callable[[str], None] = print) -> None:
    """Raise PreflightFailed with every problem found; ``pools`` are the GPU pools the run submits to (their
    workers are checked by ``check_pools`` when given: a Prefect API is there)."""
    stages = list(stages)
    problems = placeholders(profile, ("data", "model", "deploy") if pools else ("data", "model"))
    problems += check_data(profile)
    download_bytes = 0
    if profile.model.source == "hub" and "download" in stages:
        from finetune.preflight.hub import check_hub

        problem, download_bytes = check_hub(profile.model)
        problems += [problem] if problem else []
    if room := check_store_room(store, written_bytes(profile, stages, download_bytes, planned)):
        problems.append(room)
    if pools and check_pools is not None:
        problems += check_pools(pools, profile.deploy.wait_for_workers_s, log)
    if problems:
        raise PreflightFailed(problems)
