"""The spot notice, without a trainer: each cloud's metadata poller against a local emulation of its service
(flows/cloud_metadata.py), one notice handled once, and SIGTERM reaching a child started from a non-main thread."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune import notice
from finetune.spot_notice import polling
from flows.cloud_metadata import SERVERS, MetadataServer
from tunerecipes.checkpoint_layout import CHECKPOINT_LOG, CHECKPOINTS_DIR, METADATA

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts in a process that got no notice yet."""
    monkeypatch.setattr(notice, "_state", notice._State())


@pytest.fixture(params=sorted(SERVERS))
def metadata(request: pytest.FixtureRequest) -> Iterator[MetadataServer]:
    server = SERVERS[request.param]()
    yield server
    server.close()


def test_each_clouds_notice_is_delivered_within_5_s_and_nothing_before_it(metadata: MetadataServer) -> None:
    lines: list[str] = []
    with polling(metadata.cloud, metadata.url, lines.append):
        time.sleep(1.2)  # more than one poll: no notice yet must mean none delivered
        assert notice.received() is None, lines
        metadata.notify()
        deadline = time.monotonic() + 5.0
        while notice.received() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        delay = time.monotonic() - (metadata.noticed_at or 0.0)
    assert (reason := notice.received()) is not None and reason.startswith(f"{metadata.cloud} spot notice"), lines
    assert delay < 5.0
    assert not any("unreadable" in line for line in lines), lines  # the emulation refuses a wrong protocol
    if metadata.cloud == "aws":  # IMDSv2: a session token first
        assert metadata.requests[0] == ("PUT", "/latest/api/token"), metadata.requests


def test_one_notice_is_handled_once_even_when_a_signal_follows() -> None:
    calls: list[str] = []
    with notice.watch(calls.append, grace_s=1.0):
        assert notice.deliver("aws spot notice")
        assert not notice.deliver("SIGTERM")
    assert calls == ["aws spot notice"]
    later: list[str] = []
    with notice.watch(later.append, grace_s=1.0):  # a trainer starting after the notice hears of it at once
        pass
    assert later == ["aws spot notice"]


def test_unreachable_metadata_is_reported_and_polling_goes_on() -> None:
    lines: list[str] = []
    with polling("azure", "http://127.0.0.1:9", lines.append):  # nothing listens on the discard port
        time.sleep(1.2)
    assert notice.received() is None
    assert sum("unreadable" in line for line in lines) == 1, lines


_THREADED_CHILD = """
import threading, time, os, signal, sys
from finetune import notice
from finetune.procs import run_streaming
notice.install()
# os.write, not print: a second SIGTERM arriving inside print's buffered write raises a reentrant-call error.
child = [sys.executable, "-c", "import os, signal, sys, time\\n"
         "signal.signal(signal.SIGTERM, lambda *a: (os.write(1, b'child got SIGTERM\\\\n'), os._exit(0)))\\n"
         "print('ready', flush=True)\\ntime.sleep(60)"]
ready, got, errors = threading.Event(), [], []
def on_line(line):
    if line == "ready": ready.set()
    if line == "child got SIGTERM": got.append(time.monotonic())
def stage():
    try: run_streaming([child], on_line, term_grace_s=5)
    except Exception as exc: errors.append(type(exc).__name__)
thread = threading.Thread(target=stage); thread.start()
ready.wait(30)
sent = time.monotonic()
os.kill(os.getpid(), signal.SIGTERM)
thread.join(30)
print(f"delay {got[0] - sent:.3f} errors {errors}")
"""


def test_sigterm_reaches_a_child_started_from_a_non_main_thread_within_a_second() -> None:
    """Prefect runs stages in task-runner threads; the process-wide handler forwards SIGTERM to their children."""
    proc = subprocess.run([sys.executable, "-c", _THREADED_CHILD], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[0] == "delay" and float(words[1]) < 1.0, proc.stdout
    assert "Preempted" in proc.stdout, proc.stdout


def _checkpoint(output_dir: Path, step: int, reason: str) -> Path:
    """A complete checkpoint as the trainer leaves it: its directory with DCP metadata, and its line in the log."""
    (output_dir / CHECKPOINTS_DIR / f"step_{step}").mkdir(parents=True)
    (output_dir / CHECKPOINTS_DIR / f"step_{step}" / METADATA).write_bytes(b"")
    with open(output_dir / CHECKPOINT_LOG, "a") as log:
        log.write(json.dumps({"step": step, "reason": reason, "seconds": 0.1}) + "\n")
    return output_dir


def test_the_orchestrators_line_says_where_the_rerun_resumes(tmp_path: Path) -> None:
    assert notice.summary() == "preempted: no trainer was running, resumes on retry"
    notice.training_in(_checkpoint(tmp_path / "a", 7, "notice"))
    assert notice.summary() == "preempted: saved at step 7, resumes on retry"
    notice.training_in(_checkpoint(tmp_path / "b", 4, "minutes"))  # a second training, whose save did not fit
    assert notice.summary() == ("preempted: no save on notice (step + save exceed train.preemption_grace_s), resumes "
                                "from the checkpoint at step 4 on retry")
