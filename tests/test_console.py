"""What `finetune run` shows a person: stage events as lines or a live display, everything else in the run log."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

from finetune.console import StageDisplay, log_tail, output_to_log, run_log_path, stage_event
from tasks.train.launch import ReadableMetrics, step_line
from tunerecipes.report import METRICS_PREFIX


def _events() -> None:
    stage_event("train", "running", "abc")
    for step in range(1, 101):
        stage_event("train", "progress", f"step {step}/100", step / 100)
    stage_event("train", "done", "abc  12.0s")
    stage_event("download", "cached", "def")
    stage_event("publish", "skipped", "no publish.target set")


def test_without_a_terminal_each_stage_event_is_one_line() -> None:
    stream = io.StringIO()
    with StageDisplay(stream, live=False):
        _events()
    lines = stream.getvalue().splitlines()
    # running, 25/50/75 %, done, cached, skipped
    assert len(lines) == 7, lines
    assert "train" in lines[0] and "running" in lines[0]
    assert "50%" in lines[2] and "step 50/100" in lines[2]
    assert lines[4].startswith("✓ train") and "12.0s" in lines[4]
    assert "cached" in lines[5] and "no publish.target set" in lines[6]


def test_on_a_terminal_the_live_display_ends_with_one_line_per_finished_stage() -> None:
    stream = io.StringIO()
    with StageDisplay(stream, live=True):
        _events()
    text = stream.getvalue()
    assert "train" in text and "done" in text and "skipped" in text


def test_events_reach_nobody_when_no_display_listens(capfd: pytest.CaptureFixture[str]) -> None:
    _events()
    assert "step 50/100" not in "".join(capfd.readouterr())


def test_run_log_holds_python_and_subprocess_output_while_the_console_stays_free(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log = run_log_path(tmp_path, "tiny-cpu")
    with output_to_log(log) as (out, err):
        os.write(1, b"from python\n")  # what a library writes to the process's stdout / stderr
        os.write(2, b"from python stderr\n")
        subprocess.run(["sh", "-c", "echo from a child; echo child stderr >&2"], check=True)
        err.write("for the person\n")
    captured = capfd.readouterr()
    assert captured.err == "for the person\n" and captured.out == ""
    text = log.read_text()
    for line in ("from python", "from python stderr", "from a child", "child stderr"):
        assert line in text
    assert log_tail(log, 1) == "child stderr"
    assert log.parent == tmp_path and log.name.startswith("tiny-cpu-")
    assert run_log_path(tmp_path, "tiny-cpu") != log  # a second run in the same second logs to a file of its own
    with pytest.raises(FileExistsError), output_to_log(log):
        pass  # and never into another run's


def _metrics_line(step: int, total: int = 25) -> str:
    return METRICS_PREFIX + (f'{{"step": {step}, "total_steps": {total}, "loss": 1.5, "lr": 0.001, '
                             f'"tokens_per_s": 1200.0, "step_time_s": 0.5}}')


def test_trainer_metrics_reach_the_log_as_a_readable_line_every_ten_steps() -> None:
    logged: list[str] = []
    log = ReadableMetrics(logged.append)
    log("loading checkpoint")
    for step in range(1, 26):
        log(_metrics_line(step))
    assert logged[0] == "loading checkpoint"
    assert [line.split()[1] for line in logged[1:]] == ["1/25", "10/25", "20/25", "25/25"]
    assert logged[2] == "step 10/25 · loss 1.5000 · lr 1.00e-03 · 1,200 tok/s · ETA 0m08s"


def test_a_slow_trainer_logs_at_least_once_a_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 61.0, 62.0, 130.0])
    monkeypatch.setattr("tasks.train.launch.time.monotonic", lambda: next(clock))
    logged: list[str] = []
    log = ReadableMetrics(logged.append)
    for step in (1, 2, 3, 4):
        log(_metrics_line(step, total=1000))
    assert [line.split()[1] for line in logged] == ["1/1000", "2/1000", "4/1000"]


def test_step_line_without_totals() -> None:
    assert step_line({"step": 3, "loss": 2.0}) == "step 3 · loss 2.0000"
