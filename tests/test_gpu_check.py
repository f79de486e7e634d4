"""bench/gpu/check.py, the prepared GPU check (issue 19): every step scaled down on CPU, and its time budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bench.gpu.check import STEPS, Runner
from bench.gpu.sizes import quick_settings

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"ok", "steps", "train_tokens_per_s", "mfu", "baseline_tokens_per_s", "tokens_per_s_ratio",
                "predicted_peak_gib", "measured_peak_gib", "measured_reserved_peak_gib", "parity_max_abs_diff",
                "parity_tolerance", "device", "wall_s", "versions"}


@pytest.mark.slow
def test_quick_cpu_run_passes_every_step_and_prints_the_summary_last_and_under_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "bench/gpu/check.py", "--device", "cpu", "--quick", "--workdir", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {name: step.get("error") for name, step in summary["steps"].items() if step["status"] != "ok"}
    assert not failed, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0 and summary["ok"] is True
    assert SUMMARY_KEYS <= summary.keys() and set(summary["steps"]) == set(STEPS)
    assert all(step["ok"] is True and step["seconds"] >= 0 for step in summary["steps"].values())
    assert summary["train_tokens_per_s"] > 0 and summary["baseline_tokens_per_s"] > 0
    assert summary["predicted_peak_gib"] > 0 and summary["measured_peak_gib"] > 0
    assert 0 <= summary["parity_max_abs_diff"] <= summary["parity_tolerance"]
    # CPU: only what needs CUDA is missing, and says why.
    assert summary["mfu"] is None and "needs CUDA" in summary["steps"]["train"]["mfu_skipped"]
    lora = summary["steps"]["lora"]
    assert lora["resumed_from_step"] == 2 and lora["checkpoints"] == [2] and lora["async_save"] is True
    assert summary["steps"]["quantize"]["weights_compression"] > 1
    assert json.loads((out / "gpu_check_summary.json").read_text()) == summary
    assert "step quantize: ok" in (out / "gpu_check.log").read_text()
    assert not (tmp_path / "work").exists()  # every model copy deleted


def test_a_step_over_its_budget_is_stopped_and_what_needs_it_is_skipped(tmp_path: Path) -> None:
    settings = replace(quick_settings(), budgets={**quick_settings().budgets, "base": 0.5})
    runner = Runner(settings, "cpu", quick=True, out_dir=tmp_path)
    clock = time.monotonic()
    runner.run("base", lambda: time.sleep(30) or {})
    runner.run("train", lambda: {"tokens_per_s": 1.0})
    assert time.monotonic() - clock < 10
    assert runner.results["base"]["status"] == "timeout" and "budget" in runner.results["base"]["error"]
    assert runner.results["train"] == {"status": "skipped", "ok": None, "error": "needs step(s) base"}
    runner.finish()
    summary = json.loads((tmp_path / "gpu_check_summary.json").read_text())
    assert summary["ok"] is False and summary["steps"]["base"]["ok"] is False


def test_a_failing_step_is_recorded_with_its_error_and_later_independent_steps_still_run(tmp_path: Path) -> None:
    runner = Runner(quick_settings(), "cpu", quick=True, out_dir=None)
    runner.results["base"] = {"status": "ok", "ok": True}

    def broken() -> dict[str, float]:
        raise RuntimeError("no grouped mm here")

    runner.run("parity", broken)
    runner.run("train", lambda: {"tokens_per_s": 5.0})
    assert runner.results["parity"]["error"] == "RuntimeError: no grouped mm here"
    assert runner.results["train"]["status"] == "ok"
    assert runner.summary()["train_tokens_per_s"] == 5.0
