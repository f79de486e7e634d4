"""JSON a stage did not write fails once, naming the file (and line) and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.jsonfile import json_object, read_json_object
from finetune.stage import PermanentError


def test_a_broken_multi_line_file_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "hidden_size": 8,\n  "vocab_size": \n}\n')
    with pytest.raises(PermanentError, match=rf"^{path}: invalid JSON at line 4: Expecting value$"):
        read_json_object(path, "not a checkpoint")


def test_a_broken_jsonl_record_is_named_by_its_file_line_alone() -> None:
    with pytest.raises(PermanentError, match=r"^prompts.jsonl:7: invalid JSON: Expecting value$"):
        json_object('{"messages": }', "prompts.jsonl:7")


def test_a_value_that_is_not_an_object_names_what_was_expected() -> None:
    with pytest.raises(PermanentError, match=r"^prompts.jsonl:2: must be an object with messages, got list$"):
        json_object("[1, 2]", "prompts.jsonl:2", "an object with messages")


def test_a_missing_file_says_what_its_absence_means(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match=r"config.json: missing; the train stage did not finish"):
        read_json_object(tmp_path / "config.json", "the train stage did not finish")
