"""A rehearsal's data: the first records of the profile's own sources, or the embedded set and why
(flows/rehearsal_data.py, flows/rehearse.py shrink)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from finetune.profile import load_profile
from flows.rehearsal_data import sample_sources
from flows.rehearse import change_overrides, shrink


def _chat(index: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {index}"},
                         {"role": "assistant", "content": f"answer {index}"}]}


def _jsonl(path: Path, count: int, broken_line: int | None = None) -> Path:
    lines = [json.dumps(_chat(i)) for i in range(count)]
    if broken_line is not None:
        lines.insert(broken_line, '{"messages": [')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_readable_source_is_rehearsed_on_its_first_records_in_order(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "chats.jsonl", 400, broken_line=3)
    written = load_profile("maverick-lora", [f"data.source={source}"])
    sample = sample_sources(written.data, tmp_path / "rehearsal", count=50)
    rehearsed_file = Path(sample.overrides["data.source"])
    records = [json.loads(line) for line in rehearsed_file.read_text().splitlines()]
    assert records == [_chat(i) for i in range(50)]  # the unparsable line skipped, as pack drops it
    assert str(source) in sample.why and "50 of" in sample.why
    changes = {c.field: c for c in shrink(written, tmp_path / "published", sample)}
    assert changes["data.source"].as_written == str(source) and changes["data.source"].why == sample.why
    rehearsed = load_profile("maverick-lora", [f"data.source={source}", *change_overrides(list(changes.values()))])
    assert rehearsed.data.source == str(rehearsed_file) and rehearsed.data.format == written.data.format


def test_a_mix_keeps_its_weights_formats_and_splits_over_each_source_s_first_records(tmp_path: Path) -> None:
    _jsonl(tmp_path / "a.jsonl", 30)
    (tmp_path / "b").mkdir()
    rows = [_chat(100 + i) for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "b" / "train_sft-00000-of-00001.parquet")
    mix = json.dumps([{"source": str(tmp_path / "a.jsonl"), "weight": 3},
                      {"source": str(tmp_path / "b"), "weight": 1, "train_split": "train_sft"}])
    written = load_profile("scout-lora", ["data.source=null", f"data.sources={mix}"])
    sample = sample_sources(written.data, tmp_path / "rehearsal", count=10)
    (first, second) = sample.overrides["data.sources"]
    assert (first["weight"], second["weight"], second["train_split"]) == (3, 1, "train_sft")
    assert [json.loads(line) for line in Path(second["source"]).read_text().splitlines()] == rows[:10]
    rehearsed = load_profile("scout-lora", ["data.source=null", f"data.sources={mix}",
                                            *change_overrides(shrink(written, tmp_path / "published", sample))])
    assert [s.weight for s in rehearsed.data.all_sources()] == [3, 1]


def test_an_unreadable_source_falls_back_to_the_embedded_set_and_says_why(tmp_path: Path) -> None:
    written = load_profile("maverick-lora")  # its placeholder bucket, s3://your-bucket/..., is not even asked
    sample = sample_sources(written.data, tmp_path / "rehearsal")
    assert sample.overrides == {} and written.data.source in sample.why and "shipped placeholder" in sample.why
    missing = load_profile("maverick-lora", ["data.source=memory://nobody/chats.jsonl"])  # gone since the plan
    assert "no such file" in sample_sources(missing.data, tmp_path / "rehearsal").why
    changes = {c.field: c for c in shrink(written, tmp_path / "published", sample)}
    assert changes["data.source"].rehearsed == "embedded/data" and sample.why in changes["data.source"].why
