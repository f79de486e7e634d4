"""Shared fixtures. End-to-end tests share ONE real tiny-cpu pipeline run (session-scoped): CI has 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Before torch loads, in this process and every child (trainers, servers, the CLI): spinning OpenMP waits starve the
# other processes on CI's 2 cores (two quantize stages at once: 90 s each spinning, 11 s passive; entrypoints/cli.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass
class PipelineRun:
    env: dict[str, str]
    store: Path
    summary: dict[str, Any]
    console: str = ""
    """What the first run printed besides its JSON summary (stderr): the progress display."""

    def finetune(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args, check=check)

    def stage(self, name: str) -> dict[str, Any]:
        return self.summary["stages"][name]


def isolated_env(root: Path) -> dict[str, str]:
    """A private store, scratch and ephemeral Prefect (SQLite) home under root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        FINETUNE_STORE=str(root / "store"),
        FINETUNE_SCRATCH=str(root / "scratch"),
        PREFECT_HOME=str(root / "prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "entrypoints.cli", *args], env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"finetune {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def parse_summary(stdout: str) -> dict[str, Any]:
    return json.loads(stdout)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> PipelineRun:
    """The whole tiny-cpu pipeline, run once for every end-to-end test."""
    root = tmp_path_factory.mktemp("pipeline")
    env = isolated_env(root)
    proc = run_cli(env, "run", "--profile", "tiny-cpu", "--json")
    return PipelineRun(env=env, store=root / "store", summary=parse_summary(proc.stdout), console=proc.stderr)
