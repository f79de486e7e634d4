"""The ``finetune`` flow: the pipeline of flows/pipeline.py, submitted as a DAG.

Every step is submitted at once with its upstream steps' futures as inputs: Prefect starts a stage when what it
reads is finished, so the base model's evaluation runs beside training and the run graph in the UI shows the real
dependencies. Stages sharing a machine take turns through their pool's concurrency limit (flows/slots.py). The
quality gate (tuned vs base) is a task of its own that quantization waits for: a failed gate stops everything
downstream of it. Every stage is content-keyed (flows/stage_tasks.py), so a rerun picks up exactly where work
stopped.
"""

from __future__ import annotations

import base64
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import deployment, flow_run

from finetune import notice
from finetune.console import stage_event
from finetune.hashing import hash_json
from finetune.plan import check_fits, markdown, plan
from finetune.preflight import preflight
from finetune.profile import Profile, load_profile, resolved_yaml
from finetune.run_params import check_attempts, run_overrides
from finetune.store import Artifact, Store, default_store_url, now_iso
from flows.dispatch import gpu_pool_target
from flows.node_runs import check_shared_store
from flows.pipeline import BENCHMARKS, GATE_BASE, GATE_TUNED, STAGES, Step, spec, stage_keys, steps_until
from flows.pool_workers import check_pools
from flows.slots import stage_slots
from flows.stage_tasks import Payload, StageResult, Submitted, payload_artifact, stage_result, submit_stage
from tasks.benchmark import report as serving
from tasks.evaluate.report import RESULTS_FILE, check_gate, compare, markdown_table, recovery, scores
from tasks.run_report import report_markdown, run_record, write_run_record
from tasks.tracking import log_results

GATE = "quality-gate"
"""Label of the quality gate's task (tuned vs base) in the run graph and on the console."""


def _run_name() -> str:
    profile = load_profile(flow_run.parameters["profile"], run_overrides(flow_run.parameters))
    try:
        data = hash_json(spec("pack").fingerprint(profile), 8)
    except Exception:  # data that cannot be read (no driver, unreachable): the preflight task says why in one line
        data = "unread"
    return f"{profile.name}-data-{data}"


@flow(name="finetune", flow_run_name=_run_name, persist_result=True, result_serializer="json", log_prints=True)
def finetune(
    profile: str = "tiny-cpu",
    overrides: list[str] | None = None,
    store: str | None = None,
    until: str = STAGES[-1],
) -> dict[str, Any]:
    """Run the pipeline for one profile. Returns per stage: key, cached, seconds, path, metrics."""
    return _pipeline(profile, overrides or [], store, until)


@flow(name="finetune", flow_run_name=_run_name, persist_result=True, result_serializer="json", log_prints=True)
def finetune_production(
    profile: str,
    data_source: str,
    overrides: list[str] | None = None,
    store: str | None = None,
    until: str = STAGES[-1],
) -> dict[str, Any]:
    """The pipeline of a production profile, whose shipped data.source is a placeholder: ``data_source`` (the
    training data: local path, hf://datasets/..., s3://...) has no default, so Prefect refuses a deployment run
    without it."""
    return _pipeline(profile, run_overrides({"overrides": overrides, "data_source": data_source}), store, until)


def _pipeline(profile: str, overrides: list[str], store: str | None, until: str) -> dict[str, Any]:
    notice.install()  # a SIGTERM reaches the trainers in their task threads, then Prefect's handler
    check_attempts(flow_run.run_count)
    resolved = load_profile(profile, overrides)
    steps = steps_until(until, resolved)
    artifacts_store = Store(store or default_store_url())
    check_shared_store(resolved, artifacts_store)
    create_markdown_artifact(
        f"# Profile `{resolved.name}`\n\n{resolved.description}\n\n```yaml\n{resolved_yaml(resolved)}```",
        key="resolved-profile", description="The fully resolved profile this run used")
    # Before any stage: a run that cannot fit its GPUs fails here, not after the GPUs are rented.
    planned = plan(resolved)
    create_markdown_artifact(markdown(planned), key="plan",
                             description="Memory per GPU and node, time and cost of this run at its real size")
    check_fits(resolved, planned)
    started = now_iso()
    skipped = {step.label: reason for step in steps if (reason := spec(step.stage).skipped(resolved))}
    for label, reason in skipped.items():
        get_run_logger().info(f"{label}: skipped ({reason})")
        stage_event(label, "skipped", reason)
    steps = [step for step in steps if step.label not in skipped]
    targets = {step.label: gpu_pool_target(step.stage, resolved) for step in steps}
    # Before any download: the keys read the data and the hub, the stages the store and the GPU pools.
    stages = {step.stage for step in steps}
    nodes = "train" in stages and resolved.train.launcher == "prefect-pool" and deployment.id is not None
    gpu_pools = [resolved.deploy.gpu_work_pool] if nodes or any(targets.values()) else []
    preflight_task(resolved, artifacts_store.url, sorted(stages), planned, gpu_pools)
    keys = stage_keys(resolved, steps)
    pools = {step.label: resolved.deploy.gpu_work_pool if targets[step.label] else resolved.deploy.work_pool
             for step in steps}
    results: dict[str, StageResult] = {}
    status = "failed"
    try:
        with stage_slots(resolved, set(pools.values())) as slots:
            submitted: dict[str, Submitted] = {}
            gate: PrefectFuture | None = None
            for step in steps:
                submitted[step.label] = submit_stage(
                    spec(step.stage), keys[step.label], resolved, artifacts_store,
                    {slot: submitted[src] for slot, src in step.inputs.items()}, step.label,
                    gpu_pool=targets[step.label], slot=slots[pools[step.label]],
                    wait_for=[gate] if step.after_gate and gate is not None else None)
                if step.label == GATE_TUNED and GATE_BASE in submitted:  # `--until evaluate-tuned` has no gate
                    gate = quality_gate.submit(resolved, artifacts_store.url, submitted[GATE_BASE].future,
                                               submitted[GATE_TUNED].future)
            failure = _collect(steps, submitted, gate, artifacts_store, results)
        if failure is not None:
            failure.result()  # raises the first failure in pipeline order
        if "evaluate-quantized" in results:
            post_recovery(artifacts_store, results["evaluate-tuned"].artifact, results["evaluate-quantized"].artifact)
        if all(label in results for label in BENCHMARKS.values()):
            post_serving_comparison(artifacts_store, [results[label].artifact for label in BENCHMARKS.values()])
        status = "completed"
    finally:
        _post_lineage(resolved.name, artifacts_store, results)
        try:
            in_order = {step.label: results[step.label] for step in steps if step.label in results}
            _post_report(resolved, artifacts_store, in_order, skipped, started, status)
        except (OSError, ValueError, KeyError) as exc:  # a report must not turn a finished run into a failed one
            get_run_logger().warning(f"could not write the run record or report: {type(exc).__name__}: {exc}")
    return {step.label: results[step.label].summary() for step in steps if step.label in results}  # pipeline order


def _collect(steps: list[Step], submitted: dict[str, Submitted], gate: PrefectFuture | None, store: Store,
             results: dict[str, StageResult]) -> Any:
    """Wait for every step, announcing each as it finishes and posting its tables; return the first failed state in
    pipeline order (a step that never started because something upstream failed is not a failure of its own)."""
    labels = {submitted[step.label].future: step.label for step in steps}
    if gate is not None:
        labels[gate] = GATE
    for future in as_completed(list(labels)):
        future.wait()  # records the final state: the API's may still say Running when the callback fires
        label = labels[future]
        if future.state.is_failed() or future.state.is_crashed():
            stage_event(label, "failed", _first_line(future.state.message))
        elif not future.state.is_completed():
            stage_event(label, "skipped", "an upstream step failed")
        elif label == GATE:
            stage_event(label, "done", "the tuned model passed")
        else:
            results[label] = result = stage_result(submitted[label], store)
            seconds = None if result.cached else result.artifact.timings.get("seconds")
            # A stage's notice (pack: records dropped) is something the person running it must read, not only the log.
            notice = result.artifact.metrics.get("notice")
            stage_event(label, "cached" if result.cached else "done",
                        result.artifact.key[:10] + ("" if seconds is None else f"  {seconds:.1f}s")
                        + (f"  {notice}" if notice else ""))
    order = [future for step in steps for future in (submitted[step.label].future,
                                                     *([gate] if step.label == GATE_TUNED and gate else []))]
    return next((f.state for f in order if f.state.is_failed() or f.state.is_crashed()), None)


def _first_line(message: str | None, width: int = 160) -> str:
    return (message or "").strip().split("\n", 1)[0][:width]


@task(name="preflight")
def preflight_task(profile: Profile, store_url: str, stages: list[str], planned: dict[str, Any],
                   gpu_pools: list[str]) -> None:
    """What would stop this run, before anything is downloaded or rented (finetune.preflight)."""
    preflight(profile, Store(store_url), stages, planned, gpu_pools, check_pools, log=get_run_logger().info)


@task(name=GATE)
def quality_gate(profile: Profile, store_url: str, base: Payload, tuned: Payload) -> None:
    """Compare tuned with base and stop the pipeline (before quantization) if the profile's gate fails."""
    store = Store(store_url)
    base_artifact, tuned_artifact = (store.materialize(payload_artifact(p, store), [RESULTS_FILE])
                                     for p in (base, tuned))
    rows = compare(base_artifact, tuned_artifact)
    create_markdown_artifact(f"# Tuned vs base\n\n{markdown_table(rows)}\n", key="eval-deltas",
                             description="lm-eval scores of the tuned model against its base")
    check_gate(rows, profile.gate)


def post_recovery(store: Store, bf16: Artifact, w4: Artifact) -> None:
    rows = recovery(*(scores(store.materialize(artifact, [RESULTS_FILE])) for artifact in (bf16, w4)))
    create_markdown_artifact(f"# 4-bit vs bf16 quality\n\n{markdown_table(rows)}\n", key="quantized-recovery",
                             description="Share of each bf16 score the W4A16 model keeps")


def _post_report(profile: Profile, store: Store, results: dict[str, StageResult], skipped: dict[str, str],
                 started: str, status: str) -> None:
    """Leave the run's record in the store (``finetune report`` reads it) and post its report to the UI."""
    stages = {label: {"stage": r.artifact.stage, "key": r.artifact.key, "cached": r.cached,
                      "seconds": r.artifact.timings.get("seconds")} for label, r in results.items()}
    record = run_record(flow_run.name or profile.name, profile.name, profile.gate, stages, skipped, status,
                        started, now_iso())
    location = write_run_record(store, record)
    if run_id := log_results(profile, store, {label: r.artifact for label, r in results.items()}):
        get_run_logger().info(f"results logged to MLflow run {run_id}")
    create_markdown_artifact(report_markdown(store, record), key="run-report",
                             description="What the run achieved: loss, scores and gate, 4-bit, serving, stage times")
    get_run_logger().info(f"run record: {location}")


def _post_lineage(profile_name: str, store: Store, results: dict[str, StageResult]) -> None:
    rows = [{"stage": name, "key": r.artifact.key, "cached": r.cached, "seconds": r.artifact.timings.get("seconds"),
             "inputs": ", ".join(f"{k}:{v[:10]}" for k, v in r.artifact.inputs.items())}
            for name, r in results.items()]
    create_markdown_artifact(
        f"# Lineage of `{profile_name}`\n\nStore: `{store.url}`\n\n{markdown_table(rows)}\n",
        key="lineage", description="Which artifact came from which inputs")


def post_serving_comparison(store: Store, benchmarks: list[Artifact]) -> None:
    """Each benchmark step served one model; the UI shows them side by side: one table (4-bit throughput relative to
    bf16 per concurrency, or "different engines") and one latency-vs-throughput plot, each model named with its
    engine."""
    levels, engines = serving.levels_of(store.materialize(artifact, [serving.RESULTS_FILE]) for artifact in benchmarks)
    create_table_artifact(serving.comparison_rows(levels, engines), key="serving-comparison",
                          description="Serving throughput and latency, bf16 against W4A16, with the engine of each")
    title = "bf16 vs W4A16: " + "; ".join(f"{name} {engine}" for name, engine in engines.items())
    encoded = base64.b64encode(serving.latency_vs_throughput_png(levels, engines, title)).decode()
    create_markdown_artifact(f"![latency vs throughput](data:image/png;base64,{encoded})",
                             key="serving-latency-vs-throughput", description="bf16 and W4A16 on one plot")
