"""Data sources: files to splits, records with their file and line, content fingerprints, fsspec and hub sources."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune.data_sources import FileSource, HubSource, open_source, validation_split
from finetune.stage import PermanentError

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_directory_files_are_assigned_to_splits_by_name(tmp_path: Path) -> None:
    _jsonl(tmp_path / "train.jsonl", [CHAT])
    _jsonl(tmp_path / "train" / "part-2.jsonl", [CHAT])
    _jsonl(tmp_path / "validation.jsonl", [CHAT])
    _jsonl(tmp_path / "test-00000-of-00001.jsonl", [CHAT])
    _jsonl(tmp_path / ".cache" / "stray.jsonl", [CHAT])  # hidden: not data
    source = open_source(str(tmp_path))
    files = {split: [Path(p).relative_to(tmp_path).as_posix() for p in paths]
             for split, paths in source.files_by_split().items()}
    assert files == {"test": ["test-00000-of-00001.jsonl"], "train": ["train.jsonl", "train/part-2.jsonl"],
                     "validation": ["validation.jsonl"]}
    assert validation_split(source) == "validation"


def test_a_directory_naming_no_split_is_all_training_data_and_a_single_file_too(tmp_path: Path) -> None:
    _jsonl(tmp_path / "shards" / "a.jsonl", [CHAT])
    _jsonl(tmp_path / "shards" / "b.jsonl", [CHAT, CHAT])
    assert open_source(str(tmp_path / "shards"), train_split="sft").splits() == ["sft"]
    assert len(list(open_source(str(tmp_path / "shards"), train_split="sft").records("sft"))) == 3
    assert open_source(str(tmp_path / "shards" / "a.jsonl")).splits() == ["train"]
    assert validation_split(open_source(str(tmp_path / "shards"))) is None


def test_a_file_of_no_split_beside_named_ones_fails_naming_it(tmp_path: Path) -> None:
    _jsonl(tmp_path / "train.jsonl", [CHAT])
    _jsonl(tmp_path / "extra.jsonl", [CHAT])
    with pytest.raises(PermanentError, match=r"extra\.jsonl"):
        open_source(str(tmp_path)).splits()


def test_missing_source_and_empty_directory_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="no such file"):
        open_source(str(tmp_path / "nope")).splits()
    with pytest.raises(PermanentError, match="holds no"):
        open_source(str(tmp_path)).splits()


def test_json_lines_records_carry_file_and_line_and_bad_lines_are_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(CHAT) + "\n\n" + '{"messages": [\n' + json.dumps(CHAT) + "\n\n")
    records = list(open_source(str(path)).records("train"))
    assert [r.location for r in records] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert records[0].value == CHAT and records[2].value == CHAT
    assert records[1].value is None and "unparsable JSON" in str(records[1].error)


def test_json_arrays_and_parquet_rows_are_numbered(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text(json.dumps([CHAT, CHAT]))
    pq.write_table(pa.Table.from_pylist([CHAT] * 3), tmp_path / "validation.parquet")
    source = open_source(str(tmp_path))
    assert [r.location for r in source.records("train")] == [f"{tmp_path}/train.json:record {i}" for i in (1, 2)]
    rows = list(source.records("validation"))
    assert [r.location for r in rows] == [f"{tmp_path}/validation.parquet:row {i}" for i in (1, 2, 3)]
    assert rows[2].value == CHAT


def test_a_json_array_with_a_byte_order_mark_and_crlf_is_still_an_array(tmp_path: Path) -> None:
    unicode = {"messages": [{"role": "user", "content": "héllo ✓"}]}
    text = "[\r\n" + json.dumps(CHAT) + ",\r\n" + json.dumps(unicode, ensure_ascii=False) + "]"
    (tmp_path / "train.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
    records = list(open_source(str(tmp_path)).records("train"))
    assert [r.location for r in records] == [f"{tmp_path}/train.json:record {i}" for i in (1, 2)]
    assert records[0].value == CHAT and records[1].value["messages"][0]["content"] == "héllo ✓"


def test_a_broken_json_array_fails_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text('[\n{"a": 1},\n{"a": \n]')
    with pytest.raises(PermanentError, match=r"train\.json:4: unparsable JSON array"):
        list(open_source(str(tmp_path)).records("train"))


def test_fingerprint_follows_content_not_location(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for root in (first, second):
        _jsonl(root / "train.jsonl", [CHAT])
    assert open_source(str(first)).fingerprint() == open_source(str(second)).fingerprint()
    (second / "train.jsonl").write_bytes((second / "train.jsonl").read_bytes().replace(b"hello", b"hellp"))
    assert open_source(str(first)).fingerprint() != open_source(str(second)).fingerprint()


def test_fsspec_urls_read_like_local_files_with_the_same_fingerprint(tmp_path: Path) -> None:
    local = _jsonl(tmp_path / "data" / "train.jsonl", [CHAT, CHAT])
    fs = fsspec.filesystem("memory")
    fs.pipe("/pack-test-data/train.jsonl", local.read_bytes())
    try:
        remote = open_source("memory://pack-test-data")
        assert isinstance(remote, FileSource)
        records = list(remote.records("train"))
        assert [r.location for r in records] == ["memory:///pack-test-data/train.jsonl:1",
                                                 "memory:///pack-test-data/train.jsonl:2"]
        assert remote.fingerprint() == open_source(str(tmp_path / "data")).fingerprint()
    finally:
        fs.rm("/pack-test-data", recursive=True)


def test_hub_datasets_need_a_commit_sha_to_be_keyed() -> None:
    source = open_source("hf://datasets/org/chat", revision="main")
    assert isinstance(source, HubSource)
    with pytest.raises(PermanentError, match="40-hex commit sha"):
        source.fingerprint()
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert open_source("hf://datasets/org/chat", sha).fingerprint() == {"kind": "hub", "dataset": "org/chat",
                                                                        "revision": sha}


def test_hub_source_reads_rows_through_the_datasets_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No network here: `datasets` resolves a local directory through the same load_dataset call as a hub name.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    _jsonl(tmp_path / "repo" / "train.jsonl", [CHAT, CHAT])
    _jsonl(tmp_path / "repo" / "validation.jsonl", [CHAT])
    name = str(tmp_path / "repo")
    source = HubSource(name, None)
    assert sorted(source.splits()) == ["train", "validation"]
    rows = list(source.records("validation"))
    assert [r.location for r in rows] == [f"hf://datasets/{name}:validation:row 1"] and rows[0].value == CHAT
