"""What a run achieved, read back from the store: did the loss fall, did the scores rise and pass the gate, what did
4-bit keep, how fast does each model serve, how long each stage took and which were cached.

Every run leaves a small record in ``<store>/runs/<flow run name>-<UTC time>-<random>.json`` (stage labels -> artifact keys,
timings, the gate it was judged by); ``finetune report`` finds the newest record of a profile (or a named run) and
renders this report from the artifacts the record names, the flow posts the same report as a markdown artifact, and
the publish stage's model card reuses its sections.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from finetune.profile import GateConfig
from finetune.stage import PermanentError
from finetune.store import Artifact, Store, atomic_file, unique_name
from tasks.evaluate.report import RESULTS_FILE, GateFailed, check_gate, compare, markdown_table, recovery, scores
from tasks.benchmark.report import engine_label, relative

RUNS_DIR = "runs"


# -- run records ---------------------------------------------------------------------------------------------------
def run_record(flow_run: str, profile: str, gate: GateConfig, stages: Mapping[str, Mapping[str, Any]],
               skipped: Mapping[str, str], status: str, started: str, finished: str) -> dict[str, Any]:
    """``stages``: label -> {stage, key, cached, seconds}."""
    return {"flow_run": flow_run, "profile": profile, "status": status, "started": started, "finished": finished,
            "gate": gate.model_dump(mode="json"), "stages": dict(stages), "skipped": dict(skipped)}


def write_run_record(store: Store, record: dict[str, Any]) -> str:
    """Write the record next to (never inside) the stage directories; returns its URL. Atomic: a whole file or
    none (a local rename, or one PUT to an object store). Its name is unique (two runs of one name finishing in the
    same second keep both records), and a local write never replaces an existing file."""
    name = unique_name(record["flow_run"], ".json")
    payload = json.dumps(record, indent=2)  # stages stay in pipeline order
    if store.is_local:
        path = Path(store.root) / RUNS_DIR / name
        with atomic_file(path, "w", exclusive=True) as handle:
            handle.write(payload)
        return str(path)
    url = f"{store.root}/{RUNS_DIR}/{name}"
    with store.fs.open(url, "w") as handle:
        handle.write(payload)
    return store.fs.unstrip_protocol(url)


def find_run_record(store: Store, profile: str | None = None, run: str | None = None) -> dict[str, Any]:
    """The newest record of ``profile`` (or of the flow run named ``run``, or with that file name) in the store."""
    try:
        names = sorted(store.fs.ls(f"{store.root}/{RUNS_DIR}", detail=False))
    except FileNotFoundError:
        names = []
    records = []
    for name in (str(n) for n in names if str(n).endswith(".json")):
        with store.fs.open(name, "r") as handle:
            record = json.load(handle)
        stem = name.rsplit("/", 1)[-1][:-len(".json")]
        if (run is None or run in (record.get("flow_run"), stem)) and (profile is None or
                                                                        record.get("profile") == profile):
            records.append(record)
    if not records:
        wanted = f"run {run!r}" if run else f"profile {profile!r}"
        raise PermanentError(f"no finished run of {wanted} in store {store.url} (records live in "
                             f"{store.url}/{RUNS_DIR}/; `finetune run` writes one at the end of every run)")
    return max(records, key=lambda record: record["finished"])


def record_artifacts(store: Store, record: Mapping[str, Any]) -> dict[str, Artifact]:
    """The artifacts a record names, by stage label (those no longer in the store are left out), with the files
    the report reads made readable here."""
    found = {label: store.read_artifact(info["stage"], info["key"]) for label, info in record["stages"].items()}
    return {label: store.materialize(artifact, [RESULTS_FILE]) if artifact.stage == "evaluate" else artifact
            for label, artifact in found.items() if artifact is not None}


# -- sections ------------------------------------------------------------------------------------------------------
def data_section(pack: Artifact) -> str:
    splits = pack.metrics.get("splits", {})
    read = ", ".join(f"{stats['samples']} records in {name} ({stats.get('documents', '?')} kept)"
                     for name, stats in splits.items())
    notice = pack.metrics.get("notice")
    return f"{read}. " + (f"{notice}." if notice else "No record was dropped.")


def training_section(train: Artifact) -> str:
    m = train.metrics
    if m.get("first_loss") is None:
        return "No training metrics were recorded."
    speed = f", {m['tokens_per_s']:,.0f} tokens/s" if m.get("tokens_per_s") else ""
    return (f"Loss {m['first_loss']:.4f} -> {m['last_loss']:.4f} over {m['steps']} steps "
            f"({m['method']}, {m['world_size']} process(es){speed}).")


def evaluation_section(base: Artifact, tuned: Artifact, gate: GateConfig | None) -> str:
    rows = compare(base, tuned)
    table = markdown_table([{"task": r.task, "metric": r.metric, "base": r.base, "tuned": r.tuned,
                             "delta": r.delta, "± (stderr)": r.stderr} for r in rows])
    if gate is None:
        return table
    try:
        check_gate(rows, gate)
        verdict = "passed" if gate.max_drop is not None or gate.require_rise is not None else "none set"
    except GateFailed as exc:
        verdict = f"FAILED: {'; '.join(exc.failures)}"
    return f"{table}\n\nQuality gate: {verdict}."


def quantization_section(quantize: Artifact, bf16_eval: Artifact | None, w4_eval: Artifact | None) -> str:
    m = quantize.metrics
    before, after = m.get("weights_bytes_before"), m.get("weights_bytes_after")
    lines = []
    if before and after:
        lines.append(f"Weights {_size(before)} (bf16) -> {_size(after)} (W4A16), {100 * after / before:.0f}% "
                     f"of the bf16 size.")
    if bf16_eval is not None and w4_eval is not None:
        rows = recovery(scores(bf16_eval), scores(w4_eval))
        lines.append(markdown_table([{"task": r.task, "metric": r.metric, "bf16": r.bf16, "w4a16": r.w4,
                                      "recovery %": r.recovery_pct} for r in rows]))
    return "\n\n".join(lines)


def benchmark_section(benchmarks: list[Artifact]) -> str:
    """Output throughput and median TTFT per concurrency, one column per model (bf16, W4A16) from each benchmark
    step's metrics, each model's engine, and the 4-bit model's throughput relative to bf16 where the same engine served
    both ("different engines" otherwise)."""
    models = {name: levels for artifact in benchmarks for name, levels in artifact.metrics.items()
              if isinstance(levels, dict)}
    engines = {artifact.metrics.get("weights", ""): f"{engine_label(artifact.metrics)}, "
                                                    f"{artifact.metrics.get('load_generator', '')}"
               for artifact in benchmarks}
    levels = sorted({c for per_model in models.values() for c in per_model}, key=lambda c: int(c.lstrip("c")))
    rows = []
    for level in levels:
        row: dict[str, Any] = {"concurrency": int(level.lstrip("c"))}
        throughput = {name: per_model.get(level, {}).get("output_throughput") for name, per_model in models.items()}
        row |= {f"{name} tok/s": value for name, value in throughput.items()}
        row |= {f"{name} TTFT p50 ms": per_model.get(level, {}).get("median_ttft_ms")
                for name, per_model in models.items()}
        if throughput.get("bf16") and throughput.get("w4a16") is not None:
            row["w4a16 tok/s vs bf16"] = relative(throughput["w4a16"], throughput["bf16"],
                                                  engines.get("bf16") == engines.get("w4a16"))
        rows.append(row)
    served_by = "; ".join(f"{name}: {engine}" for name, engine in engines.items())
    return f"{served_by}\n\n{markdown_table(rows)}"


def stages_section(record: Mapping[str, Any]) -> str:
    rows = [{"stage": label, "cached": info["cached"], "seconds": info.get("seconds"), "key": info["key"][:12]}
            for label, info in record["stages"].items()]
    rows += [{"stage": label, "cached": "-", "seconds": None, "key": f"skipped: {reason}"}
             for label, reason in record.get("skipped", {}).items()]
    return markdown_table(rows)


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    index = 0
    while n >= 1024 and index < len(units) - 1:
        n, index = n / 1024, index + 1
    return f"{n:.0f} B" if index == 0 else f"{n:.1f} {units[index]}"


def result_sections(artifacts: Mapping[str, Artifact], gate: GateConfig | None) -> dict[str, str]:
    """Title -> markdown of every section the given artifacts (by pipeline label, their files readable here)
    can fill."""
    out: dict[str, str] = {}
    if "pack" in artifacts:
        out["Data"] = data_section(artifacts["pack"])
    if "train" in artifacts:
        out["Training"] = training_section(artifacts["train"])
    if "evaluate-base" in artifacts and "evaluate-tuned" in artifacts:
        out["Evaluation: base -> tuned"] = evaluation_section(artifacts["evaluate-base"], artifacts["evaluate-tuned"],
                                                              gate)
    if "quantize" in artifacts:
        out["4-bit (W4A16)"] = quantization_section(artifacts["quantize"], artifacts.get("evaluate-tuned"),
                                                    artifacts.get("evaluate-quantized"))
    benchmarks = [artifact for artifact in artifacts.values() if artifact.stage == "benchmark"]
    if benchmarks:
        out["Serving: bf16 vs 4-bit"] = benchmark_section(benchmarks)
    return out


def report_markdown(store: Store, record: Mapping[str, Any]) -> str:
    sections = result_sections(record_artifacts(store, record), GateConfig(**record["gate"]))
    sections["Stages"] = stages_section(record)
    head = (f"# Run `{record['flow_run']}` ({record['status']})\n\nProfile `{record['profile']}`, store "
            f"`{store.url}`, {record['started']} -> {record['finished']}")
    return head + "".join(f"\n\n## {title}\n\n{body}" for title, body in sections.items()) + "\n"
