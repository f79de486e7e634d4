"""The whole tiny-cpu pipeline through real Prefect, run ONCE per session (conftest.pipeline_run) and inspected here."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.benchmark.report import DIFFERENT_ENGINES
from tasks.serving import engines, vllm_env
from tests.conftest import PipelineRun, parse_summary

pytestmark = pytest.mark.e2e

ALL_STAGES = ["download", "pack", "train", "convert", "evaluate-base", "evaluate-tuned", "quantize",
              "evaluate-quantized", "benchmark-bf16", "benchmark-w4a16"]


def test_first_run_computes_every_stage_and_reports_it(pipeline_run: PipelineRun) -> None:
    stages = pipeline_run.summary["stages"]
    assert list(stages) == ALL_STAGES
    for name, info in stages.items():
        assert not info["cached"], name
        assert len(info["key"]) == 20 and info["seconds"] >= 0
        manifest = json.loads((Path(info["path"]) / "artifact.json").read_text())
        assert manifest["key"] == info["key"] and manifest["files"], name


def test_training_lowers_the_loss(pipeline_run: PipelineRun) -> None:
    metrics = pipeline_run.stage("train")["metrics"]
    assert metrics["last_loss"] < 0.5 * metrics["first_loss"]


def test_tuned_model_beats_its_base_on_the_held_out_task(pipeline_run: PipelineRun) -> None:
    base = pipeline_run.stage("evaluate-base")["metrics"]["scores"]
    tuned = pipeline_run.stage("evaluate-tuned")["metrics"]["scores"]
    assert tuned["tiny_synth_em/exact_match"] >= base["tiny_synth_em/exact_match"] + 10


def _cpu_vllm_version() -> str:
    """The version the project's vLLM environment on this machine reports (built by the first run's benchmark)."""
    directory = vllm_env.env_dir(vllm_env.BUILDS["cpu"])
    return json.loads((directory / vllm_env.READY).read_text())["version"]


def test_quantized_model_is_smaller_and_benchmarked_against_bf16(pipeline_run: PipelineRun) -> None:
    quantize = pipeline_run.stage("quantize")["metrics"]
    assert quantize["weights_bytes_after"] < 0.5 * quantize["weights_bytes_before"]
    results = {}
    for name in ("bf16", "w4a16"):
        benchmark = Path(pipeline_run.stage(f"benchmark-{name}")["path"])
        results[name] = json.loads((benchmark / "results.json").read_text())
        assert list(results[name]["models"]) == [name]
        assert (benchmark / "latency_vs_throughput.png").stat().st_size > 1000
    # bf16: real vLLM (its CPU build, in the environment the project made), which batches concurrent requests.
    bf16 = results["bf16"]
    assert bf16["engine"] == "vllm" and bf16["engine_version"] == _cpu_vllm_version()
    tok_s = {level["max_concurrency"]: level["output_throughput"] for level in bf16["models"]["bf16"]["levels"]}
    print(f"\nvLLM CPU bf16 output tok/s by concurrency: {tok_s}")
    assert tok_s[4] >= 1.5 * tok_s[1]
    # W4A16: vLLM's CPU build cannot load a 4-bit MoE without AMX; then the labelled stand-in serves it, and the
    # run report compares the two as different engines, not as a speed-up.
    if not engines.cpu_has_amx():
        assert "stand-in" in results["w4a16"]["engine"] and "AMX" in results["w4a16"]["engine_notes"][0]
        report = pipeline_run.finetune("report", "--profile", "tiny-cpu").stdout
        assert DIFFERENT_ENGINES in report and f"bf16: vllm {bf16['engine_version']}" in report


def test_evaluate_backend_vllm_scores_log_likelihood_through_the_server_like_the_hf_backend(
        pipeline_run: PipelineRun) -> None:
    """tiny_synth_mc (four-way log-likelihood choice) scored through vLLM's CPU build (echo + logprobs, fp32, no prefix
    caching) agrees with the in-process hf backend's score of the same tuned model within lm-eval's stderr."""
    served = parse_summary(pipeline_run.finetune("run", "--profile", "tiny-cpu", "evaluate.backend=vllm", "--until",
                                                 "evaluate-tuned", "--json").stdout)
    metrics = served["stages"]["evaluate-tuned"]["metrics"]
    hf = pipeline_run.stage("evaluate-tuned")["metrics"]
    assert metrics["backend"] == "vllm" and hf["backend"] == "hf"
    results = json.loads((Path(served["stages"]["evaluate-tuned"]["path"]) / "results.json").read_text())
    assert results["finetune"]["engine"] == f"vllm {_cpu_vllm_version()}"
    assert "--no-enable-prefix-caching" in results["finetune"]["model_args"]["server_command"]
    for metric in ("tiny_synth_mc/acc", "tiny_synth_em/exact_match"):
        stderr = max(metrics["stderr"][metric], hf["stderr"][metric])
        print(f"\n{metric}: vllm {metrics['scores'][metric]} hf {hf['scores'][metric]} (stderr {stderr})")
        assert abs(metrics["scores"][metric] - hf["scores"][metric]) <= stderr


def test_second_run_in_a_new_process_is_all_cache_hits(pipeline_run: PipelineRun) -> None:
    started = time.perf_counter()
    again = parse_summary(pipeline_run.finetune("run", "--profile", "tiny-cpu", "--json").stdout)
    assert {name: info["cached"] for name, info in again["stages"].items()} == dict.fromkeys(ALL_STAGES, True)
    assert {n: i["key"] for n, i in again["stages"].items()} == {
        n: i["key"] for n, i in pipeline_run.summary["stages"].items()}
    print(f"fully cached rerun: {time.perf_counter() - started:.1f} s wall (CLI process included)")


def test_deleted_artifact_file_recomputes_only_that_stage(pipeline_run: PipelineRun) -> None:
    pack = Path(pipeline_run.stage("pack")["path"])
    (pack / "prompts.jsonl").unlink()
    again = parse_summary(pipeline_run.finetune("run", "--profile", "tiny-cpu", "--until", "train", "--json").stdout)
    cached = {name: info["cached"] for name, info in again["stages"].items()}
    assert cached == {"download": True, "pack": False, "train": True}
    assert again["stages"]["pack"]["key"] == pipeline_run.stage("pack")["key"]
    assert (pack / "prompts.jsonl").is_file()


_READ_ARTIFACTS = """
import asyncio, json
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        artifacts = await client.read_artifacts()
        runs = await client.read_flow_runs()
        print(json.dumps({"keys": sorted({a.key for a in artifacts if a.key}),
                          "types": sorted({a.type for a in artifacts if a.type}),
                          "runs": [[r.name, r.state_name] for r in runs]}))

asyncio.run(main())
"""


def test_the_ui_shows_profile_tables_plots_deltas_and_lineage(pipeline_run: PipelineRun) -> None:
    proc = subprocess.run([sys.executable, "-c", _READ_ARTIFACTS], env=pipeline_run.env, capture_output=True,
                          text=True, check=True)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("resolved-profile", "lineage", "eval-deltas", "quantized-recovery", "train-loss-curve",
                "benchmark-bf16-latency-vs-throughput", "benchmark-w4a16-levels", "serving-comparison",
                "serving-latency-vs-throughput", "pack-pack"):
        assert key in seen["keys"], key
    assert {"markdown", "table", "progress"} <= set(seen["types"])
    assert any(name.startswith("tiny-cpu-data-") and state == "Completed" for name, state in seen["runs"])


_READ_TASK_GRAPH = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.client.schemas.sorting import FlowRunSort

async def main():
    async with get_client() as client:
        runs = await client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC)
        first = next(r for r in runs if r.name.startswith("tiny-cpu-data-"))
        tasks = await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [first.id]}))
        names = {str(t.id): t.name.rsplit("-", 1)[0] for t in tasks}
        print(json.dumps({names[str(t.id)]: {
            "upstream": sorted({names.get(str(i.id), "?") for inputs in t.task_inputs.values() for i in inputs
                                if getattr(i, "input_type", "") == "task_run"})} for t in tasks}))

asyncio.run(main())
"""


def test_the_run_graph_has_the_real_dependencies_and_stages_sharing_a_machine_take_turns(
        pipeline_run: PipelineRun) -> None:
    proc = subprocess.run([sys.executable, "-c", _READ_TASK_GRAPH], env=pipeline_run.env, capture_output=True,
                          text=True, check=True)
    graph = json.loads(proc.stdout.strip().splitlines()[-1])
    # The base model's scores need only the download: not a link in a chain behind training.
    assert graph["evaluate-base"]["upstream"] == ["download"]
    assert graph["evaluate-tuned"]["upstream"] == ["convert"]
    assert graph["quality-gate"]["upstream"] == ["evaluate-base", "evaluate-tuned"]
    assert "quality-gate" in graph["quantize"]["upstream"]  # quantization waits for the gate's verdict
    # Each model is served once it exists: bf16 after the gate, without waiting for quantization.
    assert graph["benchmark-bf16"]["upstream"] == ["convert", "pack", "quality-gate"]
    assert graph["benchmark-w4a16"]["upstream"] == ["pack", "quantize"]
    # tiny-cpu's one pool allows one stage at a time (deploy.stage_concurrency default): the stages' work (timed in
    # their manifests; a task run waiting for its slot is already Running) never overlaps.
    spans = sorted(
        (timings["started"], timings["finished"], name) for name, info in pipeline_run.summary["stages"].items()
        for timings in [json.loads((Path(info["path"]) / "artifact.json").read_text())["timings"]])
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans


def test_a_fresh_run_shows_progress_per_stage_not_its_log(pipeline_run: PipelineRun) -> None:
    lines = pipeline_run.console.splitlines()
    assert len(lines) <= 150, f"{len(lines)} lines on the console"
    assert lines[0].startswith("full log: ") and "RESUME" not in pipeline_run.console
    for label in ALL_STAGES:
        assert f"✓ {label}" in pipeline_run.console, label
    assert "no publish.target set" in pipeline_run.console
    log = Path(lines[0].split()[2])
    assert log.parent == pipeline_run.store / "runs" and "step 10/" in log.read_text()


def test_publish_goes_to_its_target_and_a_changed_target_is_published_again(pipeline_run: PipelineRun,
                                                                            tmp_path: Path) -> None:
    target = tmp_path / "published"

    def run() -> dict[str, bool]:
        out = parse_summary(pipeline_run.finetune("run", "--profile", "tiny-cpu", f"publish.target={target}",
                                                  "--json").stdout)
        return {name: info["cached"] for name, info in out["stages"].items()}

    assert run() == dict.fromkeys(ALL_STAGES, True) | {"publish": False}
    card = (target / "README.md").read_text()
    assert "Built with Llama" in card and "## Evaluation: base -> tuned" in card
    weights = (target / "model.safetensors").read_bytes()
    assert run()["publish"] is True
    (target / "model.safetensors").write_bytes(b"x" * len(weights))
    assert run()["publish"] is False
    assert (target / "model.safetensors").read_bytes() == weights
    report = pipeline_run.finetune("report", "--profile", "tiny-cpu").stdout
    assert "| publish | False |" in report and "Quality gate: passed" in report
