"""Run records in <store>/runs/ and the report `finetune run` ends with and `finetune report` prints again."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from entrypoints.cli import main
from finetune.profile import GateConfig, RequireRise
from finetune.stage import PermanentError
from finetune.store import Artifact, Store, atomic_file
from tasks.run_report import find_run_record, report_markdown, run_record, write_run_record
from tests.test_publish import upstream  # noqa: F401  (the fixture: finished upstream artifacts in a store)


def _record(inputs: dict[str, Artifact], flow_run: str, finished: str, gate: GateConfig | None = None,
            profile: str = "tiny-cpu") -> dict:
    stages = {label: {"stage": a.stage, "key": a.key, "cached": label == "download", "seconds": 1.5}
              for label, a in inputs.items()}
    return run_record(flow_run, profile, gate or GateConfig(), stages, {"publish": "no publish.target set"},
                      "completed", "2026-01-01T00:00:00Z", finished)


def test_the_newest_record_of_a_profile_or_a_named_run_is_found(upstream: tuple[Store, dict[str, Artifact]]) -> None:  # noqa: F811
    store, inputs = upstream
    write_run_record(store, _record(inputs, "tiny-cpu-data-1", "2026-01-01T01:00:00Z"))
    write_run_record(store, _record(inputs, "tiny-cpu-data-2", "2026-01-01T02:00:00Z"))
    write_run_record(store, _record(inputs, "other-data-3", "2026-01-01T03:00:00Z", profile="other"))
    assert find_run_record(store, "tiny-cpu")["flow_run"] == "tiny-cpu-data-2"
    assert find_run_record(store, run="tiny-cpu-data-1")["flow_run"] == "tiny-cpu-data-1"
    assert find_run_record(store)["flow_run"] == "other-data-3"
    with pytest.raises(PermanentError, match="no finished run of profile 'nope'"):
        find_run_record(store, "nope")
    assert not list(Path(store.root).glob("runs/.*"))  # atomic writes leave no temp files


def test_two_runs_of_one_name_finishing_in_the_same_second_keep_both_records(
        upstream: tuple[Store, dict[str, Artifact]], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    store, inputs = upstream
    monkeypatch.setattr(time, "gmtime", lambda *_: time.struct_time((2026, 1, 1, 1, 0, 0, 3, 1, 0)))
    first = write_run_record(store, _record(inputs, "tiny-cpu-data-1", "2026-01-01T01:00:00Z"))
    second = write_run_record(store, _record(inputs, "tiny-cpu-data-1", "2026-01-01T01:00:00Z", profile="other"))
    assert first != second and Path(first).name.startswith("tiny-cpu-data-1-20260101T010000Z-")
    assert {json.loads(Path(p).read_text())["profile"] for p in (first, second)} == {"tiny-cpu", "other"}


def test_a_record_write_never_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "runs" / "taken.json"
    target.parent.mkdir()
    target.write_text("first")
    with pytest.raises(FileExistsError), atomic_file(target, "w", exclusive=True) as handle:
        handle.write("second")
    assert target.read_text() == "first" and [p.name for p in target.parent.iterdir()] == ["taken.json"]


def test_the_report_tells_loss_scores_gate_recovery_serving_and_stage_times(
        upstream: tuple[Store, dict[str, Artifact]]) -> None:  # noqa: F811
    store, inputs = upstream
    gate = GateConfig(require_rise=RequireRise(task="tiny_synth_em", by=90))
    text = report_markdown(store, _record(inputs, "tiny-cpu-data-1", "2026-01-01T01:00:00Z", gate))
    for needed in ("Loss 6.0000 -> 0.1000 over 30 steps", "| tiny_synth_em | exact_match | 10.00 | 90.00 | 80.00",
                   "Quality gate: FAILED: tiny_synth_em exact_match rose 80.0 points", "Weights 64 B (bf16) -> 16 B",
                   "| tiny_synth_em | exact_match | 90.00 | 85.00 | 94.44 |", "| 1 | 20.00 | 25.00 | 70.00 | 60.00 |",
                   "| download | True | 1.50 |", "| publish | - | - | skipped: no publish.target set |"):
        assert needed in text, needed


def test_finetune_report_prints_it_and_fails_clearly_without_runs(
        upstream: tuple[Store, dict[str, Artifact]], capsys: pytest.CaptureFixture[str],  # noqa: F811
        tmp_path: Path) -> None:
    store, inputs = upstream
    location = write_run_record(store, _record(inputs, "tiny-cpu-data-1", "2026-01-01T01:00:00Z"))
    assert json.loads(Path(location).read_text())["stages"]["train"]["key"] == inputs["train"].key
    assert main(["report", "--profile", "tiny-cpu", "--store", str(store.root)]) == 0
    assert "# Run `tiny-cpu-data-1` (completed)" in capsys.readouterr().out
    assert main(["report", "--store", str(tmp_path / "empty")]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_the_data_section_says_how_many_records_were_dropped_why_and_where() -> None:
    from tasks.run_report import data_section

    notice = "2 of 5 records dropped (invalid_json 2); first at d.jsonl:2, d.jsonl:4; all in /s/pack/k/dropped.jsonl"
    pack = Artifact(stage="pack", key="k", path="/s/pack/k", metrics={
        "notice": notice, "splits": {"train": {"samples": 5, "documents": 3}}})
    assert data_section(pack) == f"5 records in train (3 kept). {notice}."
    pack.metrics.pop("notice")
    assert data_section(pack).endswith("No record was dropped.")
