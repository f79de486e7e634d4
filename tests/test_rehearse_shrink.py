"""What a rehearsal changes in a production profile, and what it keeps as written (flows/rehearse.py shrink)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.profile import REPO_ROOT, load_profile
from flows.rehearse import change_overrides, kubernetes_pools, shrink

KEPT = ("deploy.work_pool", "deploy.gpu_work_pool", "deploy.gpu_stages", "train.launcher", "train.nnodes",
        "train.nproc_per_node", "train.expert_parallel", "train.method", "train.dtype", "train.elastic",
        "convert.final_format", "evaluate.backend", "evaluate.weights", "benchmark.engine", "benchmark.weights",
        "retries.count", "model.family")


def _rehearsed(name: str, tmp_path: Path):
    written = load_profile(name)
    changes = shrink(written, tmp_path / "published")
    return written, changes, load_profile(name, change_overrides(changes))


@pytest.mark.parametrize("name", ["maverick-lora", "scout-qlora", "scout-dpo", "maverick-sft"])
def test_a_rehearsal_keeps_what_breaks_at_real_size_and_lists_every_change(name: str, tmp_path: Path) -> None:
    written, changes, rehearsed = _rehearsed(name, tmp_path)
    changed = {change.field for change in changes}
    for field in KEPT:
        section, _, attr = field.partition(".")
        if hasattr(getattr(written, section), attr):
            assert field not in changed
            assert getattr(getattr(rehearsed, section), attr) == getattr(getattr(written, section), attr), field
    assert rehearsed.model.source == "embedded" and rehearsed.model.family == written.model.family
    assert {rehearsed.train.device, rehearsed.evaluate.device, rehearsed.quantize.device} == {"cpu"}
    assert rehearsed.publish.target == str(tmp_path / "published")
    assert rehearsed.deploy.job_variables["env"]["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule"
    assert all(change.why and change.as_written != change.rehearsed for change in changes)
    # Tensor parallelism the shrunk model's 4 heads cannot take is the only serving change.
    assert rehearsed.benchmark.tensor_parallel_size == 1
    assert ("benchmark.tensor_parallel_size" in changed) == (written.benchmark.tensor_parallel_size > 1)


def test_maverick_lora_rehearses_two_nodes_of_eight_with_expert_parallel_sixteen(tmp_path: Path) -> None:
    written, changes, rehearsed = _rehearsed("maverick-lora", tmp_path)
    assert (rehearsed.train.nnodes, rehearsed.train.nproc_per_node, rehearsed.train.expert_parallel) == (2, 8, 16)
    assert rehearsed.train.launcher == "prefect-pool" and rehearsed.deploy.gpu_work_pool == "gpu-h200"
    by_field = {change.field: change for change in changes}
    assert by_field["train.checkpoint_every_minutes"].as_written == 1.5
    assert by_field["model.source"].as_written == "hub"
    assert "128 routed experts" in by_field["model.source"].why
    assert by_field["benchmark.tensor_parallel_size"].as_written == 8


def test_preference_profiles_rehearse_on_the_shipped_preference_pairs(tmp_path: Path) -> None:
    _, _, rehearsed = _rehearsed("scout-dpo", tmp_path)
    assert rehearsed.data.source == "embedded/preferences" and rehearsed.data.format == "preference"


def test_the_kubernetes_pools_are_those_create_pools_makes_kubernetes() -> None:
    assert kubernetes_pools() == {"gpu-h100", "gpu-h200"}


def test_a_typo_in_a_rehearsal_override_fails_before_any_server_starts(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "entrypoints.cli", "rehearse", "--profile", "maverick-lora",
                           "--store", str(tmp_path / "s"), "train.nproc_per_nod=4"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nproc_per_nod" in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()
