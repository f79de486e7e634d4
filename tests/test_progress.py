"""A stage's progress through a real Prefect server: the stage never waits for it, the UI gets the newest value."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.local_cluster import LocalPrefect, start_server
from flows.progress import StageProgress

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPrefect]:
    started = start_server(tmp_path_factory.mktemp("progress-server"))
    try:
        yield started
    finally:
        started.stop()


def test_progress_never_waits_for_a_frozen_server_and_the_ui_gets_the_newest_value(server: LocalPrefect) -> None:
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        progress = StageProgress("train 0123456789")
        os.killpg(server.procs["server"].pid, signal.SIGSTOP)  # a server that answers in minutes, or not at all
        try:
            slowest = 0.0
            for step in range(1, 201):
                started = time.monotonic()
                progress(step / 200, f"step {step}/200")
                slowest = max(slowest, time.monotonic() - started)
            assert not progress.close(timeout_s=1)  # the newest value is still on its way
        finally:
            os.killpg(server.procs["server"].pid, signal.SIGCONT)
        assert slowest < 0.5, slowest  # a request to the frozen server would have taken its whole timeout
        assert progress.close(timeout_s=120)
    artifact = server.api("GET", f"/artifacts/{progress.artifact_id}")
    assert (artifact["data"], artifact["description"]) == (100.0, "step 200/200"), artifact
