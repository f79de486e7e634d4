"""Two `finetune run`s on one store (a schedule firing during a manual run, a retry while a lost worker still runs the
old attempt): every stage is computed once, the other run waits and takes the artifact as a cache hit; kill -9 of
the computing run hands the stage to the waiting one, which resumes from the checkpoint the killed one left."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import isolated_env
from tests.test_deployments_server import _wait
from tunerecipes.checkpoint_layout import METRICS_FILE

pytestmark = pytest.mark.slow  # two pipeline runs with real trainers

STEPS, EVERY = 40, 10
OVERRIDES = [f"train.max_steps={STEPS}", f"train.checkpoint_every_steps={EVERY}", "data.max_seq_len=64",
             "train.batch_size=2"]
STAGES = ("download", "pack", "train")


class CliRun:
    """`finetune run --until train --json` in the background, with its own Prefect home and a shared store."""

    def __init__(self, root: Path, name: str, store: Path, steps: int = STEPS):
        env = isolated_env(root / name)
        self.log_path = root / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "entrypoints.cli", "run", "--profile", "tiny-cpu", "--store", str(store),
             "--until", "train", "--json", "-v", *OVERRIDES, f"train.max_steps={steps}"],
            env=env, stdout=subprocess.PIPE, stderr=open(self.log_path, "w"), text=True, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def summary(self, timeout_s: float = 600) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=timeout_s)
        assert self.proc.returncode == 0, f"exit {self.proc.returncode}:\n{self.log()[-6000:]}"
        return json.loads(out)["stages"]

    def kill(self) -> None:
        """kill -9, as a lost machine; then the ephemeral API server it leaves on this one is stopped (its trainer
        gets SIGTERM from its death signal, as it would from a reclaimed node's kubelet)."""
        family = psutil.Process(self.proc.pid).children(recursive=True)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for process in family:
            with contextlib.suppress(psutil.Error):
                if "uvicorn" in " ".join(process.cmdline()):
                    process.kill()

    def stop(self) -> None:
        """Whatever is left of the run after a failed test."""
        if self.proc.poll() is None:
            for process in [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            self.proc.wait()


@pytest.fixture
def runs() -> Iterator[list[CliRun]]:
    started: list[CliRun] = []
    yield started
    for run in started:
        run.stop()


def _launches(*runs: CliRun) -> int:
    return sum(run.log().count("trainer process(es)") for run in runs)


def _steps(workdir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (workdir / METRICS_FILE).read_text().splitlines() if line.strip()]


def test_two_runs_on_one_store_compute_each_stage_once(tmp_path: Path, runs: list[CliRun]) -> None:
    store = tmp_path / "store"
    first = CliRun(tmp_path, "a", store)
    runs.append(first)
    time.sleep(3)
    second = CliRun(tmp_path, "b", store)
    runs.append(second)
    a, b = first.summary(), second.summary()
    for stage in STAGES:
        assert {k: a[stage][k] for k in ("key", "path", "metrics")} == {k: b[stage][k] for k in ("key", "path",
                                                                                                   "metrics")}
        assert sorted([a[stage]["cached"], b[stage]["cached"]]) == [False, True], (stage, a[stage], b[stage])
    assert _launches(first, second) == 1
    assert _steps(Path(a["train"]["path"])) == list(range(1, STEPS + 1))  # one trainer wrote it, in order
    waited = next(run for run in (first, second) if "waiting for it" in run.log())
    wait_s = [float(s) for s in re.findall(r"the run we waited for is done, after ([\d.]+) s", waited.log())]
    print(f"\nwaits of the second run: {wait_s} s")


def test_kill_9_of_the_computing_run_hands_the_stage_to_the_waiting_one(tmp_path: Path, runs: list[CliRun]) -> None:
    store, steps = tmp_path / "store", 100  # long enough that the second run is waiting when the first is killed
    runs.append(CliRun(tmp_path, "a", store, steps))
    time.sleep(3)
    runs.append(CliRun(tmp_path, "b", store, steps))

    def waiting_for_train() -> CliRun | None:
        return next((run for run in runs if re.search(r"\btrain [0-9a-f]{12}: .* waiting for it", run.log())), None)

    taker = _wait(waiting_for_train, 300, "one run to wait for the other's train stage")
    holder = next(run for run in runs if run is not taker)
    workdir = _wait(lambda: next((p.parent for p in (store / "train").glob(f"*/{METRICS_FILE}")
                                  if len(_steps(p.parent)) >= EVERY + 3), None), 300, "the holder past a checkpoint")
    killed_at = _steps(workdir)[-1]
    holder.kill()
    killed = time.monotonic()
    _wait(lambda: "trainer process(es)" in taker.log(), 120, "the takeover")
    takeover_s = time.monotonic() - killed
    summary = taker.summary()
    resumed = summary["train"]["metrics"]["resumed_from_step"]
    assert summary["train"]["cached"] is False and summary["train"]["metrics"]["steps"] == steps
    # The killed run's trainer got SIGTERM from its death signal and saved on notice: at most a step or two is lost,
    # never more than one checkpoint interval.
    assert resumed is not None and killed_at - EVERY <= resumed <= killed_at + 2, (killed_at, resumed)
    assert _steps(workdir) == list(range(1, steps + 1))  # trimmed to the resume step, then continued in order
    print(f"\nkill -9 at step {killed_at}: taken over in {takeover_s:.1f} s, resumed from step {resumed} "
          f"({max(0, killed_at - resumed)} steps lost), reasons {summary['train']['metrics']['checkpoints_by_reason']}")
