"""`finetune rehearse` of the production profiles CI rehearses, as a user runs it: the CLI, a real Prefect server, its
process workers standing in for the GPU pools, the drills, and the store checked against the report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from finetune.profile import REPO_ROOT, load_profile
from flows.pipeline import STAGES, steps_until

pytestmark = pytest.mark.e2e



def _every_step_completed(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every step of the profile's pipeline ran (none cached, none skipped) in pipeline order."""
    expected = [step.label for step in steps_until(STAGES[-1], load_profile(report["profile"]))]
    stages = report["stages"]
    assert list(stages) == expected and all(s["status"] == "completed" for s in stages.values()), stages
    assert report["skipped"] == {}, report["skipped"]
    return stages


def _rehearse(profile: str, store: Path) -> dict[str, Any]:
    """One rehearsal at a time: two at once took 1012 s where one after the other take 892 s (2 cores, CPU-bound)."""
    proc = subprocess.run([sys.executable, "-m", "entrypoints.cli", "rehearse", "--profile", profile, "--store",
                           str(store), "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    report = json.loads(proc.stdout)
    print(f"\n{profile}: {report['wall_seconds']} s; stages "
          f"{ {label: s['seconds'] for label, s in report['stages'].items()} }; drills {report['drills']}; "
          f"memory {report['memory']}")
    return report


def _train_dir(store: Path) -> Path:
    (artifact,) = store.glob("train/*/artifact.json")
    return artifact.parent


def _drills_recovered(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    drills = {d["kind"].split(":")[0]: d for d in report["drills"]}
    assert set(drills) == {"spot notice", "worker killed"}, drills
    assert all(d["recovered"] and d["steps_lost"] <= 1 for d in drills.values()), drills
    return drills


def test_maverick_lora_rehearses_two_nodes_of_eight_with_expert_parallel_sixteen_and_both_drills(
        tmp_path: Path) -> None:
    store = tmp_path / "store"
    report = _rehearse("maverick-lora", store)
    assert (report["world_size"], report["expert_parallel"], report["nnodes"], report["launcher"]) == \
        (16, 16, 2, "prefect-pool")
    assert report["status"] == "Completed"
    stages = _every_step_completed(report)
    assert stages["benchmark-bf16"]["engine"].startswith("vllm") and stages["evaluate-tuned"]["engine"].startswith(
        "vllm"), stages
    drills = _drills_recovered(report)
    nodes = {r["node_rank"]: r for r in report["flow_runs"] if r["flow"] == "finetune-train-node"}
    assert set(nodes) == {0, 1} and all(r["pool"] == "gpu-h200" for r in nodes.values())
    # The notice rescheduled node 1's run (PID 1's SIGTERM behaviour), which rejoined the rendezvous; node 0's run
    # was never stopped: its agent restarted its trainers, the stage was not retried.
    assert nodes[1]["states"].count("AwaitingRetry") == 1 and nodes[1]["states"].count("Running") == 2, nodes
    assert nodes[0]["states"].count("Running") == 1 and nodes[0]["states"][-1] == "Completed", nodes
    # Every node run joined the one c10d endpoint node 0 published, and renewed the train stage's server lease while
    # it trained (the key outlives a killed orchestrator). Flow runs' output is in their workers' logs.
    worker_logs = "".join(path.read_text(errors="replace") for path in Path(report["logs"]).glob("worker-gpu-*.log"))
    endpoints = re.findall(r"node (\d): rendezvous \S+ at (127\.0\.0\.1:\d+)", worker_logs)
    assert {rank for rank, _ in endpoints} == {"0", "1"} and len({at for _, at in endpoints}) == 1, endpoints
    assert set(re.findall(r"node (\d): renewing the stage's lease on finetune-key-train-", worker_logs)) == {"0", "1"}
    assert report["kubernetes_jobs"] and all(job["problems"] == [] and job["gpus"] == 8
                                             for job in report["kubernetes_jobs"])
    # The store agrees with the report.
    train = _train_dir(store)
    metrics = json.loads((train / "artifact.json").read_text())["metrics"]
    assert (metrics["world_size"], metrics["expert_parallel"]) == (16, 16)
    saves = [json.loads(line) for line in (train / "checkpoints.jsonl").read_text().splitlines()]
    reasons = [s["reason"] for s in saves]
    assert reasons.count("minutes") >= 2 and reasons.count("notice") >= 1, saves
    notice = drills["spot notice"]
    assert notice["resumed_from_step"] == notice["step_at_notice"] == next(
        s["step"] for s in saves if s["reason"] == "notice")
    assert report["memory"]["measured_peak_rss_gib_per_trainer"] > 0
    assert report["memory"]["planned_peak_gib_per_process"] > 0


def test_scout_qlora_rehearses_its_four_bit_evaluation_path(tmp_path: Path) -> None:
    report = _rehearse("scout-qlora", tmp_path / "store")
    assert (report["world_size"], report["nnodes"], report["method"]) == (1, 1, "qlora")
    assert "quantize-base" in _every_step_completed(report)
    _drills_recovered(report)
    assert report["kubernetes_jobs"] and all(job["problems"] == [] and job["gpus"] == 1
                                             for job in report["kubernetes_jobs"])
