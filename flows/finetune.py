"""The ``finetune`` flow: profile -> download -> pack -> train -> convert -> evaluate -> quantize -> benchmark.

``download`` runs before ``pack`` because packing applies the model's own tokenizer and chat template.
Every stage is content-keyed (see flows/stage_tasks.py), so a rerun picks up exactly where work stopped.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from finetune.hashing import hash_json
from finetune.profile import REPO_ROOT, Profile, load_profile, resolved_yaml
from finetune.store import Artifact, Store
from flows.multinode import check_shared_store
from flows.stage_tasks import StageResult, run_stage
from tasks.evaluate.report import RESULTS_FILE, check_gate, compare, markdown_table, recovery, scores

# Stage order of the pipeline; `until` stops after the named one.
STAGES = ("download", "pack", "train", "convert", "evaluate", "quantize", "benchmark")


def default_store_url() -> str:
    return os.environ.get("FINETUNE_STORE", str(REPO_ROOT / ".store"))


def _run_name() -> str:
    params = flow_run.parameters
    profile = load_profile(params["profile"], params.get("overrides") or [])
    return f"{profile.name}-data-{hash_json(_spec('pack').fingerprint(profile), 8)}"


def _spec(stage: str):
    return importlib.import_module(f"tasks.{stage}").SPEC


@flow(name="finetune", flow_run_name=_run_name, persist_result=True, log_prints=True)
def finetune(
    profile: str = "tiny-cpu",
    overrides: list[str] | None = None,
    store: str | None = None,
    until: str = "benchmark",
) -> dict[str, Any]:
    """Run the pipeline for one profile. Returns per stage: key, cached, seconds, path, metrics."""
    if until not in STAGES:
        raise ValueError(f"until must be one of {', '.join(STAGES)}, got {until!r}")
    resolved = load_profile(profile, overrides or [])
    artifacts_store = Store(store or default_store_url())
    check_shared_store(resolved, artifacts_store)
    create_markdown_artifact(
        f"# Profile `{resolved.name}`\n\n{resolved.description}\n\n```yaml\n{resolved_yaml(resolved)}```",
        key="resolved-profile", description="The fully resolved profile this run used")
    results: dict[str, StageResult] = {}
    wanted = STAGES[: STAGES.index(until) + 1]

    def stage(name: str, inputs: dict[str, str], label: str | None = None) -> StageResult:
        result = run_stage(_spec(name), resolved, artifacts_store,
                           {slot: results[src].artifact for slot, src in inputs.items()}, label=label)
        results[label or name] = result
        return result

    chain: list[tuple[str, dict[str, str], str | None]] = [
        ("download", {}, None),
        ("pack", {"download": "download"}, None),
        ("train", {"download": "download", "pack": "pack"}, None),
        ("convert", {"download": "download", "train": "train"}, None),
        ("evaluate", {"model": "download"}, "evaluate-base"),
        ("evaluate", {"model": "convert"}, "evaluate-tuned"),
        ("quantize", {"convert": "convert", "pack": "pack"}, None),
        ("evaluate", {"model": "quantize"}, "evaluate-quantized"),
        ("benchmark", {"convert": "convert", "quantize": "quantize", "pack": "pack"}, None),
    ]
    try:
        for name, inputs, label in chain:
            if name not in wanted:
                break
            stage(name, inputs, label)
            if name == "evaluate":  # the gate and the recovery table read its scores on this machine
                artifacts_store.materialize(results[label].artifact, [RESULTS_FILE])
            if label == "evaluate-tuned":
                quality_gate(resolved, results["evaluate-base"].artifact, results["evaluate-tuned"].artifact)
            if label == "evaluate-quantized":
                post_recovery(results["evaluate-tuned"].artifact, results["evaluate-quantized"].artifact)
    finally:
        _post_lineage(resolved.name, artifacts_store, results)
    return {name: result.summary() for name, result in results.items()}


@task(name="quality-gate")
def quality_gate(profile: Profile, base: Artifact, tuned: Artifact) -> None:
    """Compare tuned with base and stop the pipeline (before quantization) if the profile's gate fails."""
    rows = compare(base, tuned)
    create_markdown_artifact(f"# Tuned vs base\n\n{markdown_table(rows)}\n", key="eval-deltas",
                             description="lm-eval scores of the tuned model against its base")
    check_gate(rows, profile.evaluate.gate)


def post_recovery(bf16: Artifact, w4: Artifact) -> None:
    rows = recovery(scores(bf16), scores(w4))
    create_markdown_artifact(f"# 4-bit vs bf16 quality\n\n{markdown_table(rows)}\n", key="quantized-recovery",
                             description="Share of each bf16 score the W4A16 model keeps")


def _post_lineage(profile_name: str, store: Store, results: dict[str, StageResult]) -> None:
    rows = [{"stage": name, "key": r.artifact.key, "cached": r.cached, "seconds": r.artifact.timings.get("seconds"),
             "inputs": ", ".join(f"{k}:{v[:10]}" for k, v in r.artifact.inputs.items())}
            for name, r in results.items()]
    create_markdown_artifact(
        f"# Lineage of `{profile_name}`\n\nStore: `{store.url}`\n\n{markdown_table(rows)}\n",
        key="lineage", description="Which artifact came from which inputs")
