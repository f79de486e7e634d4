"""Spot reclaim drills, as the platforms deliver the notice: SIGTERM to `finetune run` alone (a container's first
process, also as PID 1 of its own PID namespace), SIGTERM to every process (a VM shutdown), each cloud's
instance-metadata notice from a local emulation, and a notice when a step and a save do not fit the grace. Each ends
with a rerun that resumes at the saved step, losing at most one step, with no process of the stopped run left.

Trainings are short (`--until train`, a few steps of the tiny model); drills chain where a drill's rerun can be the
next drill, because starting a trainer costs more than its steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from entrypoints.orchestrator import COOKIE_VAR
from finetune import notice, spot_notice
from finetune.stage import Preempted
from flows.cloud_metadata import SERVERS
from tests.conftest import isolated_env, parse_summary, run_cli
from tests.test_faults import leftovers
from tests.test_train import Run, inputs  # noqa: F401  (inputs: the module fixture with download and pack)
from tunerecipes.checkpoint_layout import CHECKPOINTS_DIR, saved_on_notice
from tunerecipes.report import parse_metrics

pytestmark = pytest.mark.slow  # starts the pipeline and real trainers

REPO = Path(__file__).resolve().parents[1]
STEPS = 16
GRACE_S = 30
CLI_RUN = ["run", "--until", "train", "data.max_seq_len=64", f"train.max_steps={STEPS}", "train.batch_size=2",
           "train.warmup_steps=1", "train.checkpoint_every_steps=100000", "train.recipe_overrides={num_threads: 1}",
           f"train.preemption_grace_s={GRACE_S}"]
SIGNAL_AT_STEP = 3
LINE = re.compile(r"^preempted: saved at step (\d+), resumes on retry$")


def _steps_done(store: Path) -> int:
    found = list(store.glob("train/*/metrics.jsonl"))
    return len(found[0].read_text().splitlines()) if found else 0


def _family(cookie: str) -> list[int]:
    alive = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(COOKIE_VAR) == cookie and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process.pid)
        except (psutil.Error, OSError):
            continue
    return alive


def _cli_drill(root: Path, send: Callable[[subprocess.Popen[str]], None], prefix: list[str] | None = None) -> int:
    """Run the CLI until training reaches SIGNAL_AT_STEP past where it starts, deliver the notice with ``send``, and
    check the stop: exit 143 within the grace, the one line, a notice checkpoint no earlier than the step training
    had reached, and nothing of the run alive 5 s later. Returns the saved step."""
    cookie = uuid.uuid4().hex
    env = {**isolated_env(root), COOKIE_VAR: cookie}
    store = root / "store"
    start = _steps_done(store)
    proc = subprocess.Popen([*(prefix or []), sys.executable, "-m", "entrypoints.cli", *CLI_RUN], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while _steps_done(store) < start + SIGNAL_AT_STEP and proc.poll() is None:
        time.sleep(0.05)
    reached = _steps_done(store)
    sent = time.monotonic()
    send(proc)
    _, err = proc.communicate(timeout=GRACE_S + 30)
    took = time.monotonic() - sent
    assert proc.returncode == notice.EXIT_CODE, err[-3000:]
    assert took < GRACE_S, f"exited {took:.1f} s after the notice"
    last = err.strip().splitlines()[-1]
    assert (match := LINE.match(last)), err[-3000:]
    saved = int(match.group(1))
    assert reached <= saved < STEPS, (reached, saved)
    metrics = next(store.glob("train/*/metrics.jsonl"))
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, saved + 1)), steps  # resumed where the last stop saved; no step lost or redone
    time.sleep(5)
    assert _family(cookie) == [], "processes of the stopped run are still alive"
    print(f"notice at step {reached}, saved step {saved}, exit 143 after {took:.1f} s")
    return saved


def _rerun_resumes(root: Path, saved: int) -> None:
    summary = parse_summary(run_cli(isolated_env(root), *CLI_RUN, "--json").stdout)
    metrics = summary["stages"]["train"]["metrics"]
    assert metrics["resumed_from_step"] == saved and metrics["steps"] == STEPS, metrics
    assert [x for x in leftovers(root / "store") if not x.startswith("runs/")] == []  # runs/: logs and records


def _sigterm_to_every_process(proc: subprocess.Popen[str]) -> None:
    """A VM shutdown: every process gets SIGTERM (the Prefect server too), in no particular order."""
    root = psutil.Process(proc.pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass


def _sigterm_to_pid_1(proc: subprocess.Popen[str]) -> None:
    """A container stopped by Kubernetes or Docker: SIGTERM to its first process only."""
    psutil.Process(proc.pid).children()[0].send_signal(signal.SIGTERM)  # unshare --fork: the namespace's PID 1


CAN_UNSHARE = os.geteuid() == 0 and shutil.which("unshare") is not None


def test_sigterm_to_the_cli_as_pid_1_and_to_every_process_each_save_exit_143_and_resume(tmp_path: Path) -> None:
    """Two drills on one training, the second a rerun of the first (the metrics show it resumed at the saved step):
    SIGTERM to the CLI alone as PID 1 of its own PID namespace (a container stopped by Kubernetes or Docker; without
    root, which unshare --pid needs, to the CLI alone), then to every process (a VM shutdown); then a rerun finishes
    from the last notice checkpoint."""
    if CAN_UNSHARE:
        saved = [_cli_drill(tmp_path, _sigterm_to_pid_1, prefix=["unshare", "--pid", "--fork", "--mount-proc"])]
    else:
        warnings.warn("PID-1 drill run as SIGTERM to the CLI alone: a PID namespace of its own needs root")
        saved = [_cli_drill(tmp_path, lambda proc: proc.send_signal(signal.SIGTERM))]
    saved.append(_cli_drill(tmp_path, _sigterm_to_every_process))
    assert saved == sorted(set(saved)), saved
    _rerun_resumes(tmp_path, saved[-1])


def test_each_clouds_metadata_notice_then_one_that_does_not_fit_each_resume(inputs, tmp_path: Path,  # noqa: F811
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The train stage with train.spot_notice polling a local emulation; the notice starts answering mid-train.
    Each stop's rerun is the next drill: AWS, GCP, Azure, then a notice when step + save exceed the grace (0 s:
    nothing is saved on it, the time-based checkpoint is what remains), then a rerun to the end."""
    work = tmp_path / "work"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    # The AWS and Azure pollers look once a POLL_S; on a fast machine a 1 s poll lets ~25 steps of the tiny model go
    # by before the notice is acted on, and the four drills then run out of steps (CI saw the no-fit drill start at
    # step 46 of 48). Polled every 0.2 s here, the drills stay a few steps apart whatever the machine's speed.
    monkeypatch.setattr(spot_notice, "POLL_S", 0.2)
    steps = 64
    base = [f"train.max_steps={steps}", "train.checkpoint_every_steps=100000"]
    resume_at = 0
    for cloud in ["aws", "gcp", "azure", "no-fit"]:
        assert resume_at + SIGNAL_AT_STEP + 4 < steps, f"no steps left for the {cloud} drill (resumes at {resume_at})"
        monkeypatch.setattr(notice, "_state", notice._State())  # a fresh process's state: no notice yet
        server = SERVERS["aws" if cloud == "no-fit" else cloud]()
        overrides = [*base, f"train.spot_notice={server.cloud}", f"train.spot_notice_url={server.url}"]
        if cloud == "no-fit":
            overrides += ["train.preemption_grace_s=0", "train.checkpoint_every_minutes=0.001"]
        seen: dict[str, float] = {}

        def on_line(line: str) -> None:
            record = parse_metrics(line)
            if record and record["step"] >= resume_at + SIGNAL_AT_STEP and not server.noticed.is_set():
                seen["step"] = record["step"]
                server.notify()
            if line.startswith(f"{server.cloud} spot notice"):
                seen["delivered"] = time.monotonic()

        run = Run(inputs, work, *overrides, on_line=on_line)
        try:
            with pytest.raises(Preempted):
                run()
        finally:
            server.close()
        assert run.logged_steps()[0] == resume_at + 1, (cloud, run.logged_steps()[:3])
        assert seen["delivered"] - (server.noticed_at or 0) < 5.0, cloud
        step, on_notice = saved_on_notice(work)
        assert step is not None and on_notice is (cloud != "no-fit"), (cloud, step)
        assert step >= seen["step"] - 1, (cloud, step, seen)  # at most one step lost
        assert not [p for p in psutil.Process().children(recursive=True)  # session fixtures' servers are not ours
                    if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
        print(f"{cloud}: notice at step {seen['step']}, acted on in {seen['delivered'] - server.noticed_at:.2f} s, "
              f"checkpoint {step} ({'notice' if on_notice else 'by time'})")
        resume_at = step
    monkeypatch.setattr(notice, "_state", notice._State())
    metrics = Run(inputs, work, *base)()
    assert metrics["resumed_from_step"] == resume_at and metrics["steps"] == steps
    assert not list(work.glob(f"{CHECKPOINTS_DIR}/.tmp-*"))  # (the finished stage removes checkpoints/ itself)
    print(json.dumps({"checkpoints_by_reason": metrics["checkpoints_by_reason"]}))
