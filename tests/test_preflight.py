"""`finetune preflight`: each problem that would stop a run is found before any download, in one line that says
what is wrong and what to do (the finetune flow runs the same checks as its first task)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from entrypoints.cli import main
from finetune.procs import free_port
from tests.hub_stub import StubHub, stub_hub

# scout-lora as the user runs it, with shipped data and no GPU pool (the pool check has its own test, with a server).
SCOUT = ["--profile", "scout-lora", "--until", "train", "deploy.gpu_stages=[]"]
DATA = "data.source=embedded/data"


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # no token of this machine's login
    monkeypatch.setenv("FINETUNE_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("FINETUNE_SCRATCH", str(tmp_path / "scratch"))


@pytest.fixture(scope="module", autouse=True)
def _planner_loaded() -> None:
    """Import the planner (torch) once, outside the timed checks: a process pays it once, before the flow's preflight."""
    import finetune.plan.planner  # noqa: F401


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[StubHub]:
    with stub_hub(StubHub()) as started:
        monkeypatch.setenv("HF_ENDPOINT", started.url)
        yield started


def preflight_errors(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    """The error lines of `finetune preflight ARGS`, checked to come within 60 s."""
    started = time.monotonic()
    code = main(["preflight", *args])
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err
    lines = [line.removeprefix("error: ") for line in err.splitlines() if line.startswith("error: ")]
    assert (code == 2) == bool(lines), err
    return lines


def test_placeholder_data_source_is_refused_with_how_to_give_data(capsys, hub: StubHub) -> None:
    (line,) = preflight_errors(capsys, *SCOUT)
    assert line.startswith("data.source is the shipped placeholder s3://your-bucket/llama4-sft/: give your data")
    assert "--param data_source=" in line


def test_s3_source_without_s3fs_names_the_extra_to_install(capsys, hub: StubHub, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as on a machine without the s3 extra
    (line,) = preflight_errors(capsys, *SCOUT, "data.source=s3://my-data/chats/")
    assert line == ("data.source s3://my-data/chats/: the fsspec driver for s3:// is not installed: "
                    "pip install 'llama4-finetune[s3]'")


def test_hub_offline_says_the_hub_cannot_be_reached(capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    (line,) = preflight_errors(capsys, *SCOUT, DATA)
    assert line.startswith("cannot reach the hub at http://127.0.0.1:") and "ConnectError" in line


@pytest.mark.parametrize(("auth", "info", "expected"), [
    (401, 200, "the hub refused meta-llama/Llama-4-Scout-17B-16E-Instruct without a valid token (401): set HF_TOKEN"),
    (403, 200, "the account of HF_TOKEN has no access to the gated repo meta-llama/Llama-4-Scout-17B-16E-Instruct "
               "(403): accept the license at"),
    (200, 404, "model.revision main does not exist in meta-llama/Llama-4-Scout-17B-16E-Instruct (hub said 404)"),
], ids=["401-no-token", "403-gated", "404-revision"])
def test_hub_refusals_are_told_apart(capsys, hub: StubHub, auth: int, info: int, expected: str) -> None:
    hub.auth_status, hub.info_status = auth, info
    (line,) = preflight_errors(capsys, *SCOUT, DATA)
    assert line.startswith(expected), line
    assert not any("/resolve/" in request for request in hub.requests)  # no file was fetched


def test_store_too_small_for_the_download_is_refused_before_it(capsys, hub: StubHub) -> None:
    hub.files = {"config.json": 2_000, "model-00001-of-00001.safetensors": 10**18}  # an exabyte of weights
    (line,) = preflight_errors(capsys, *SCOUT, DATA)
    assert re.search(r"has [\d,.]+ GB free but this run writes about 1,000,000,00\d.\d GB", line), line
    assert line.endswith("pass --store / FINETUNE_STORE a larger volume")
    assert not any("/resolve/" in request for request in hub.requests)


def test_a_runnable_profile_passes(capsys, hub: StubHub) -> None:
    assert main(["preflight", *SCOUT, DATA]) == 0
    assert capsys.readouterr().out == "preflight of scout-lora: ok\n"


def test_a_run_no_worker_takes_fails_its_wait_naming_the_pool(monkeypatch) -> None:
    from flows import pickup

    clock = [0.0]
    monkeypatch.setattr(pickup.time, "monotonic", lambda: clock[0])
    watch = pickup.PickupWatch("gpu-h200", bound_s=600)
    watch.check("run", "SCHEDULED", "Late", "stage train (flow run x)")
    clock[0] = 599.0
    watch.check("run", "SCHEDULED", "Late", "stage train (flow run x)")
    watch.check("run", "RUNNING", "Running", "stage train (flow run x)")  # taken: the count starts again
    clock[0] = 1000.0
    watch.check("run", "SCHEDULED", "AwaitingRetry", "stage train (flow run x)")
    clock[0] = 1601.0
    with pytest.raises(pickup.NotPickedUp, match=r"stage train \(flow run x\) waited 601 s in Late and no worker of "
                                                 r"pool gpu-h200 took it: start a worker for it \(`prefect worker "
                                                 r"start --pool gpu-h200`"):
        watch.check("run", "SCHEDULED", "Late", "stage train (flow run x)")
