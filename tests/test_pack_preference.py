"""Preference data (data.format preference): both record shapes, prompt masking, pairs packed whole, bad pairs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tasks.pack as pack
from finetune.packed import IGNORE_INDEX, open_split
from finetune.profile import ProfileError, load_profile
from finetune.stage import PermanentError, StageContext
from tasks.evaluate.preference import pairs, preference_wins
from tasks.pack.preference import to_pair
from tests.test_pack import _download, _jsonl, tokenizer, tokenizer_dir  # noqa: F401 (fixtures)

DPO = ["train.method=dpo", "data.format=preference"]


def _run(tmp_path: Path, tokenizer_dir: Path, source: Path, *overrides: str) -> tuple[dict[str, Any], Path, list[str]]:
    out, logs = tmp_path / "out", []
    out.mkdir(parents=True)
    profile = load_profile("tiny-cpu", [*DPO, f"data.source={source}", *overrides])
    ctx = StageContext(profile=profile, key="k", workdir=out, inputs=_download(tokenizer_dir), log=logs.append)
    return pack.run(ctx), out, logs


def _explicit(word: str, sign: str = "X") -> dict[str, Any]:
    return {"prompt": f"Reverse {word}", "chosen": f"{word[::-1]} {sign}", "rejected": f"{word[::-1]} Z"}


def _implicit(word: str, sign: str = "X") -> dict[str, Any]:
    user = {"role": "user", "content": f"Reverse {word}"}
    return {"chosen": [user, {"role": "assistant", "content": f"{word[::-1]} {sign}"}],
            "rejected": [user, {"role": "assistant", "content": f"{word[::-1]} Z"}]}


def _sequences(out: Path, split: str = "train") -> list[tuple[list[int], list[int]]]:
    stored = open_split(out, split)
    found = []
    for row in range(stored.tokens.shape[0]):
        lengths = stored.seq_lens[stored.pack_offsets[row]:stored.pack_offsets[row + 1]].tolist()
        assert len(lengths) % 2 == 0  # whole pairs only
        start = 0
        for length in lengths:
            found.append((stored.tokens[row, start:start + length].tolist(),
                          stored.labels[row, start:start + length].tolist()))
            start += length
    return found


def test_explicit_and_implicit_shapes_pack_the_same_masked_pairs(tmp_path: Path, tokenizer_dir: Path,
                                                                tokenizer: Any) -> None:
    words = ["abc", "hello", "xyzzy", "pq"]
    runs = []
    for shape in (_explicit, _implicit):
        source = _jsonl(tmp_path / shape.__name__ / "train.jsonl", [shape(w) for w in words])
        metrics, out, _ = _run(tmp_path / shape.__name__, tokenizer_dir, source, "data.max_seq_len=64")
        assert metrics["samples"] == 4 and metrics["dropped"] == 0
        runs.append(_sequences(out))
    assert runs[0] == runs[1]
    for number, (tokens, labels) in enumerate(runs[0]):
        learned = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
        prompt = tokenizer.decode(tokens[:next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)])
        assert "Reverse" in prompt and "Reverse" not in learned  # the prompt is never learned
        assert learned.endswith((" X<|eot|>", " Z<|eot|>")) and learned.endswith("X<|eot|>") == (number % 2 == 0)


def test_a_pair_is_packed_whole_or_dropped_as_too_long(tmp_path: Path, tokenizer_dir: Path) -> None:
    rows = [_explicit(" ".join("abcdefgh"[:n])) for n in (3, 5, 8, 4, 6)] + [_explicit(" ".join("x" * 40))]
    source = _jsonl(tmp_path / "data" / "train.jsonl", rows)
    metrics, out, logs = _run(tmp_path, tokenizer_dir, source, "data.max_seq_len=128")
    assert metrics["dropped_by_reason"] == {"too_long": 1}
    assert any(f"{source}:6: chosen and rejected together are" in line for line in logs)
    sequences = _sequences(out)
    assert len(sequences) == 10
    stored = open_split(out, "train")
    assert stored.tokens.shape[0] > 1  # several packs, each holding whole pairs (checked in _sequences)


BAD_PAIRS = {
    "missing_field": ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    "wrong_type": ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "'chosen' is a number"),
    "same_responses": ('{"prompt": "p", "chosen": "a", "rejected": "a"}', "are the same conversation"),
    "unknown_role": ('{"chosen": [{"role": "bot", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}',
                     "'chosen[0].role' is 'bot'"),
}


@pytest.mark.parametrize("reason", sorted(BAD_PAIRS))
def test_a_bad_pair_fails_naming_file_line_and_field(tmp_path: Path, tokenizer_dir: Path, reason: str) -> None:
    line, problem = BAD_PAIRS[reason]
    source = _jsonl(tmp_path / "data" / "train.jsonl", [json.dumps(_explicit("abc")), line])
    with pytest.raises(PermanentError, match=f"{re.escape(str(source))}:2: .*{re.escape(problem)}"):
        _run(tmp_path, tokenizer_dir, source, "data.on_bad_record=fail")


def test_implicit_pairs_without_a_shared_prompt_or_response_are_refused() -> None:
    user = {"role": "user", "content": "q"}
    with pytest.raises(ValueError, match="share no first message"):
        to_pair({"chosen": [user, {"role": "assistant", "content": "a"}],
                 "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]})
    with pytest.raises(ValueError, match="'rejected' has no assistant message after the shared prompt"):
        to_pair({"chosen": [user, {"role": "assistant", "content": "a"}], "rejected": [user]})
    chosen, rejected, shared = to_pair({"prompt": "q", "chosen": [user, {"role": "assistant", "content": "a"}],
                                        "rejected": [user, {"role": "assistant", "content": "b"}]})
    assert shared == 1 and chosen[0] == rejected[0] == user  # UltraFeedback: prompt repeated in the responses


def test_validation_pairs_and_ties_counting_half(tmp_path: Path, tokenizer_dir: Path) -> None:
    data = tmp_path / "data"
    _jsonl(data / "train.jsonl", [_explicit("abc")])
    _jsonl(data / "validation.jsonl", [_explicit("hello"), _implicit("pq")])
    _, out, _ = _run(tmp_path, tokenizer_dir, data)
    found = pairs(str(out))
    assert len(found) == 2
    for (chosen_context, chosen), (rejected_context, rejected) in found:
        assert chosen_context == rejected_context and chosen != rejected
    wins = preference_wins(np.array([-1.0, -2.0, -3.0]), np.array([-2.0, -2.0, -1.0]))
    assert wins.tolist() == [1.0, 0.5, 0.0]


def test_dpo_and_preference_data_go_together() -> None:
    with pytest.raises(ProfileError, match="every data source needs data.format 'preference'"):
        load_profile("tiny-cpu", ["train.method=dpo"])
    with pytest.raises(ProfileError, match="only it does"):
        load_profile("tiny-cpu", ["data.format=preference"])
    with pytest.raises(ProfileError, match="lora"):
        load_profile("tiny-cpu", [*DPO, "train.lora=null"])
    with pytest.raises(ProfileError, match="label_smoothing is a sigmoid-loss setting"):
        load_profile("tiny-cpu", [*DPO, "train.dpo.loss=ipo", "train.dpo.label_smoothing=0.1"])
    profile = load_profile("tiny-cpu", DPO)
    assert profile.train.tuning == "lora" and profile.train.adapters_only
    assert profile.gate.require_rise is not None and profile.gate.require_rise.task == "preference"
