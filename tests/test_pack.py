"""The pack stage: exact packing, loss masks from the model's chat template, bad records, splits, keys, collation."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config
from torchtune.data import padded_collate_packed

import tasks.pack as pack
from tasks.pack import mix
from embedded.tokenizer import save_tokenizer
from finetune.packed import IGNORE_INDEX, assign_packs, build_packs, write_meta, write_split
from finetune.packed_dataset import PackedDataset, positions
from finetune.profile import REPO_ROOT, load_profile
from finetune.stage import PermanentError, StageContext, execute_stage, stage_key
from finetune.store import Artifact, Store
from tasks.pack.chat import ChatEncoder, load_tokenizer
from tasks.pack.records import BadRecord, to_messages

PAD = 5


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory's tokenizer files: the embedded Llama-4-format tokenizer with its chat template."""
    path = tmp_path_factory.mktemp("model")
    save_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    return load_tokenizer(tokenizer_dir)


def _download(tokenizer_dir: Path) -> dict[str, Artifact]:
    return {"download": Artifact(stage="download", key="model", path=str(tokenizer_dir))}


def _context(tmp_path: Path, tokenizer_dir: Path, *overrides: str) -> tuple[StageContext, list[str]]:
    out, logs = tmp_path / "out", []
    out.mkdir(parents=True)
    profile = load_profile("tiny-cpu", list(overrides))
    return StageContext(profile=profile, key="k", workdir=out, inputs=_download(tokenizer_dir), log=logs.append), logs


def _run(tmp_path: Path, tokenizer_dir: Path, source: Path, *overrides: str) -> tuple[dict[str, Any], Path, list[str]]:
    ctx, logs = _context(tmp_path, tokenizer_dir, f"data.source={source}", *overrides)
    return pack.run(ctx), ctx.workdir, logs


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def _documents(dataset: PackedDataset) -> list[tuple[list[int], list[int]]]:
    """(tokens, labels) of every document of every pack, in pack order (the padding left out)."""
    docs = []
    for index, item in enumerate(dataset):
        stored = dataset.stored
        lengths = stored.seq_lens[stored.pack_offsets[index]:stored.pack_offsets[index + 1]].tolist()
        for start, length in zip(np.cumsum(lengths) - lengths, lengths):
            docs.append((item["tokens"][start:start + length].tolist(), item["labels"][start:start + length].tolist()))
    return docs


def _chat(user: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


# -- packing --------------------------------------------------------------------------------------------------------


def _reference_best_fit_decreasing(lengths: np.ndarray, capacity: int) -> int:
    rooms: list[int] = []
    for length in sorted(lengths.tolist(), reverse=True):
        fits = [i for i, room in enumerate(rooms) if room >= length]
        if fits:
            best = min(fits, key=lambda i: rooms[i])
            rooms[best] -= length
        else:
            rooms.append(capacity - length)
    return len(rooms)


@pytest.mark.parametrize("seed", range(8))
def test_assign_packs_is_best_fit_decreasing_and_never_overflows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 50, size=400)
    packs = assign_packs(lengths, 64)
    loads = np.bincount(packs, weights=lengths)
    assert loads.max() <= 64 and np.all(loads > 0)
    assert packs.max() + 1 == _reference_best_fit_decreasing(lengths, 64)
    first_docs = [np.flatnonzero(packs == p)[0] for p in range(packs.max() + 1)]
    assert first_docs == sorted(first_docs)  # packs numbered in data order


def test_assign_packs_rejects_documents_longer_than_a_pack() -> None:
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        assign_packs(np.array([3, 9]), 8)


def test_build_packs_keeps_every_token_once_in_order_with_padding_only_at_the_end() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=300)
    tokens = rng.integers(10, 500, size=int(lengths.sum())).astype(np.int32)
    labels = np.where(rng.random(tokens.size) < 0.5, IGNORE_INDEX, tokens).astype(np.int32)
    packed = build_packs(tokens, labels, lengths, 64, PAD)
    starts = np.cumsum(lengths) - lengths
    assert sorted(packed.doc_order.tolist()) == list(range(lengths.size))  # every document exactly once
    for p in range(packed.tokens.shape[0]):
        docs = packed.doc_order[packed.pack_offsets[p]:packed.pack_offsets[p + 1]]
        assert docs.tolist() == sorted(docs.tolist())  # data order inside a pack
        offset = 0
        for doc in docs.tolist():  # documents back to back from the row's start, never split
            source = slice(starts[doc], starts[doc] + lengths[doc])
            row = slice(offset, offset + lengths[doc])
            assert packed.tokens[p, row].tolist() == tokens[source].tolist()
            assert packed.labels[p, row].tolist() == [IGNORE_INDEX, *labels[source][1:].tolist()]
            offset += lengths[doc]
        assert offset <= 64 and offset == packed.seq_lens[packed.pack_offsets[p]:packed.pack_offsets[p + 1]].sum()
        assert np.all(packed.tokens[p, offset:] == PAD) and np.all(packed.labels[p, offset:] == IGNORE_INDEX)
    stats = packed.stats()
    assert stats["tokens"] == tokens.size and stats["density"] > 0.97
    assert stats["trainable_tokens"] == int(np.count_nonzero(packed.labels != IGNORE_INDEX))


def test_packed_dataset_items_collate_with_torchtune_into_document_masks(tmp_path: Path) -> None:
    lengths = np.array([5, 3, 7, 2, 6, 4])
    tokens = np.arange(10, 10 + lengths.sum(), dtype=np.int32)
    packed = build_packs(tokens, tokens.copy(), lengths, 10, PAD)
    write_split(tmp_path, "train", packed)
    write_meta(tmp_path, 10, PAD, {"train": packed.stats()})
    component = {"_component_": "finetune.packed_dataset.PackedDataset", "path": str(tmp_path), "split": "train", "packed": True}
    dataset = config.instantiate(OmegaConf.create(component))  # as a torchtune recipe's `dataset:` builds it
    assert isinstance(dataset, PackedDataset) and isinstance(dataset, torch.utils.data.Dataset) and len(dataset) == 3
    items = [dataset[i] for i in range(len(dataset))]
    for item in items:
        assert item["seq_lens"].sum() == 10 and item["tokens"].dtype == torch.long
        assert item["input_pos"].tolist() == positions(item["seq_lens"].numpy()).tolist()
    batch = padded_collate_packed(items)
    assert batch["tokens"].shape == (3, 10)
    assert torch.equal(batch["input_pos"], torch.stack([item["input_pos"] for item in items]))
    for mask, item in zip(batch["mask"], items):
        segment = torch.repeat_interleave(torch.arange(len(item["seq_lens"])), item["seq_lens"])
        expected = (segment[:, None] == segment[None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
        assert torch.equal(mask, expected)  # causal, and never across documents
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=padded_collate_packed)
    assert sum(b["tokens"].shape[0] for b in loader) == 3


def test_packed_dataset_refuses_a_tokenizer_argument_and_unknown_splits(tmp_path: Path) -> None:
    packed = build_packs(np.arange(4, dtype=np.int32), np.arange(4, dtype=np.int32), np.array([4]), 8, PAD)
    write_split(tmp_path, "train", packed)
    write_meta(tmp_path, 8, PAD, {"train": packed.stats()})
    with pytest.raises(TypeError, match="keyword arguments"):
        PackedDataset(object())  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="validation"):
        PackedDataset(tmp_path, split="validation")
    with pytest.raises(FileNotFoundError, match="not a finished pack"):
        PackedDataset(tmp_path / "train")


# -- tokenization and masks ---------------------------------------------------------------------------------------


def test_segments_tokenize_exactly_like_the_whole_conversation(tokenizer: Any) -> None:
    rows = [json.loads(line) for line in (REPO_ROOT / "embedded/data/validation.jsonl").read_text().splitlines()]
    encoder = ChatEncoder(tokenizer, train_on_input=False)
    encoded = encoder.encode([encoder.segments(r["messages"], "x") for r in rows])
    whole = [tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"] for r in rows]
    assert encoded.tokens.tolist() == [t for ids in whole for t in ids]
    assert encoded.lengths.tolist() == [len(ids) for ids in whole]


def test_chat_loss_covers_assistant_turns_and_their_end_of_turn_only(tmp_path: Path, tokenizer_dir: Path,
                                                                    tokenizer: Any) -> None:
    multi = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                          {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Reverse a b"},
                          {"role": "assistant", "content": "b a"}]}
    source = _jsonl(tmp_path / "data" / "train.jsonl", [multi, _chat("Reverse x y z", "z y x")])
    metrics, out, _ = _run(tmp_path, tokenizer_dir, source)
    docs = _documents(PackedDataset(out))
    assert len(docs) == 2 and metrics["samples"] == 2 and metrics["dropped"] == 0

    def learned(*answers: str) -> list[int]:
        return [t for a in answers for t in tokenizer(a + "<|eot|>", add_special_tokens=False)["input_ids"]]

    for (tokens, labels), row, answers in zip(docs, (multi, _chat("Reverse x y z", "z y x")),
                                              (("Hello", "b a"), ("z y x",))):
        assert tokens == tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"]
        assert [label for label in labels if label != IGNORE_INDEX] == learned(*answers)
        kept = [t for t, label in zip(tokens, labels) if label != IGNORE_INDEX]
        assert kept == [label for label in labels if label != IGNORE_INDEX]  # labels are the tokens themselves
    assert metrics["trainable_tokens"] == len(learned("Hello", "b a", "z y x"))


def test_train_on_input_learns_every_token_but_each_documents_first(tmp_path: Path, tokenizer_dir: Path) -> None:
    source = _jsonl(tmp_path / "data" / "train.jsonl", [_chat("Reverse a b", "b a"), _chat("Reverse c d", "d c")])
    metrics, out, _ = _run(tmp_path, tokenizer_dir, source, "data.train_on_input=true")
    for tokens, labels in _documents(PackedDataset(out)):
        assert labels == [IGNORE_INDEX, *tokens[1:]]
    assert metrics["trainable_tokens"] == metrics["tokens"] - 2


def test_alpaca_records_become_a_user_prompt_and_an_assistant_answer(tmp_path: Path, tokenizer_dir: Path,
                                                                   tokenizer: Any) -> None:
    rows = [{"instruction": "Reverse the letters", "input": "c a t", "output": "t a c"},
            {"instruction": "Say yes", "output": "yes"}]
    source = _jsonl(tmp_path / "data" / "train.jsonl", rows)
    metrics, out, _ = _run(tmp_path, tokenizer_dir, source, "data.format=alpaca")
    docs = _documents(PackedDataset(out))
    assert metrics["samples"] == 2 and len(docs) == 2
    prompts = [tokenizer.decode([t for t, l in zip(tokens, labels) if l == IGNORE_INDEX]) for tokens, labels in docs]
    answers = [tokenizer.decode([l for l in labels if l != IGNORE_INDEX]) for _, labels in docs]
    assert "user<|header_end|>\n\nReverse the letters\n\nc a t<|eot|>" in prompts[0]
    assert "user<|header_end|>\n\nSay yes<|eot|>" in prompts[1]
    assert answers == ["t a c<|eot|>", "yes<|eot|>"]


def _documents_of(rows: list[dict[str, Any]], tokenizer: Any) -> list[list[int]]:
    return [tokenizer.apply_chat_template(row["messages"], tokenize=True)["input_ids"] for row in rows]


def test_openai_text_content_parts_pack_as_their_joined_text(tmp_path: Path, tokenizer_dir: Path,
                                                            tokenizer: Any) -> None:
    parts = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Reverse "}, {"type": "text", "text": "a b"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "b a"}]}]}
    assert to_messages(parts, "chat") == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Reverse a b"},
                                          {"role": "assistant", "content": "b a"}]
    metrics, out, _ = _run(tmp_path, tokenizer_dir, _jsonl(tmp_path / "data" / "train.jsonl", [parts]))
    assert metrics["dropped"] == 0
    assert [tokens for tokens, _ in _documents(PackedDataset(out))] == _documents_of(
        [{"messages": to_messages(parts, "chat")}], tokenizer)


def test_tool_and_ipython_roles_are_chat_roles() -> None:
    record = {"messages": [{"role": "user", "content": "weather?"}, {"role": "ipython", "content": "{\"t\": 3}"},
                           {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "3, sunny"}]}
    assert [m["role"] for m in to_messages(record, "chat")] == ["user", "ipython", "tool", "assistant"]


SHAREGPT = {"system": "Be brief.", "conversations": [
    {"from": "human", "value": "Reverse a b"}, {"from": "gpt", "value": "b a"},
    {"from": "human", "value": "weather?"}, {"from": "function", "value": "sunny"},
    {"from": "observation", "value": "warm"}, {"from": "tool", "value": "dry"}, {"from": "gpt", "value": "nice"}]}


def test_sharegpt_speakers_map_to_chat_roles(tmp_path: Path, tokenizer_dir: Path, tokenizer: Any) -> None:
    messages = to_messages(SHAREGPT, "sharegpt")
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "Be brief."), ("user", "Reverse a b"), ("assistant", "b a"), ("user", "weather?"),
        ("tool", "sunny"), ("tool", "warm"), ("tool", "dry"), ("assistant", "nice")]
    metrics, out, _ = _run(tmp_path, tokenizer_dir, _jsonl(tmp_path / "data" / "train.jsonl", [SHAREGPT]),
                           "data.format=sharegpt")
    assert metrics["dropped"] == 0
    assert [tokens for tokens, _ in _documents(PackedDataset(out))] == _documents_of([{"messages": messages}],
                                                                                     tokenizer)


def test_an_unknown_sharegpt_speaker_fails_naming_file_line_and_speaker(tmp_path: Path, tokenizer_dir: Path) -> None:
    bot = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}
    source = _jsonl(tmp_path / "data" / "train.jsonl", [SHAREGPT, bot])
    with pytest.raises(PermanentError, match=re.escape(f"{source}:2: 'conversations[1].from' is 'bot'")):
        _run(tmp_path, tokenizer_dir, source, "data.format=sharegpt", "data.on_bad_record=fail")


def test_a_record_of_another_shape_names_the_format_it_looks_like() -> None:
    with pytest.raises(BadRecord, match="missing field 'messages'.*looks like data.format: sharegpt"):
        to_messages(SHAREGPT, "chat")
    with pytest.raises(BadRecord, match="missing field 'conversations'.*looks like data.format: chat"):
        to_messages(_chat("a", "b"), "sharegpt")


def test_messy_json_lines_bom_crlf_unicode_and_broken_lines_pack(tmp_path: Path, tokenizer_dir: Path,
                                                                 tokenizer: Any) -> None:
    rows = [_chat("Reverse é ✓", "✓ é"), _chat("Reverse a b", "b a")]
    lines = [json.dumps(rows[0], ensure_ascii=False).encode(), b'{"messages": [{"role": "user",',
             b'"content": "hi"}]}', json.dumps(rows[1]).encode()]
    source = tmp_path / "data" / "train.jsonl"
    source.parent.mkdir()
    source.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    metrics, out, _ = _run(tmp_path, tokenizer_dir, source)
    assert metrics["dropped_by_reason"] == {"invalid_json": 2}
    assert [tokens for tokens, _ in _documents(PackedDataset(out))] == _documents_of(rows, tokenizer)


# -- bad records -------------------------------------------------------------------------------------------------

BAD_LINES: dict[str, tuple[str, str]] = {
    # reason: (line, what the message must say)
    "invalid_json": ('{"messages": [', "unparsable JSON"),
    "missing_field": ('{"text": "hello"}', "missing field 'messages'"),
    "wrong_type": (json.dumps({"messages": [{"role": "user", "content": 5}]}), "'messages[0].content' is a number"),
    "empty_text": (json.dumps(_chat("   ", "x")), "'messages[0].content' is empty"),
    "no_assistant_turn": (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant message"),
    "too_long": (json.dumps(_chat("a " * 200, "b")), "exceed data.max_seq_len 64"),
    "unknown_role": (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}),
                     "'messages[1].role' is 'robot'; allowed: system, user, assistant, tool, ipython, function"),
    "non_text_content": (json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]},
        {"role": "assistant", "content": "a cat"}]}), "'messages[0].content[1]' is a 'image_url' part"),
}


def test_bad_records_are_dropped_and_counted_by_reason_with_file_and_line(tmp_path: Path,
                                                                          tokenizer_dir: Path) -> None:
    good = json.dumps(_chat("Reverse a b", "b a"))
    lines = [good, *(line for line, _ in BAD_LINES.values()), "[1, 2]", good]
    source = _jsonl(tmp_path / "data" / "train.jsonl", lines)
    metrics, out, logs = _run(tmp_path, tokenizer_dir, source, "data.max_seq_len=64")
    assert metrics["samples"] == len(lines) and metrics["dropped"] == len(lines) - 2
    assert metrics["dropped_by_reason"] == {**{reason: 1 for reason in BAD_LINES}, "wrong_type": 2}
    assert len(_documents(PackedDataset(out))) == 2
    examples = metrics["splits"]["train"]["dropped_examples"]
    assert examples[0] == f"{source}:2: unparsable JSON (Expecting value)" and len(examples) == 5
    assert any(f"{source}:3: missing field 'messages'" in line for line in logs)
    # Every drop, not only the first five, is located in the artifact's drops file.
    drops = [json.loads(line) for line in (out / metrics["dropped_file"]).read_text().splitlines()]
    assert sorted((d["file"], d["line"]) for d in drops) == [(str(source), n) for n in range(2, len(lines))]
    assert drops[-1 - 1] == {"split": "train", "file": str(source), "line": len(lines) - 1, "reason": "wrong_type",
                         "problem": "record is a list, expected a JSON object", "excerpt": "[1, 2]"}
    assert drops[0]["excerpt"] == '{"messages": ['
    assert metrics["notice"] == (f"{len(lines) - 2} of {len(lines)} records dropped (wrong_type 2, empty_text 1, "
                                 f"invalid_json 1, missing_field 1, no_assistant_turn 1, non_text_content 1, "
                                 f"too_long 1, unknown_role 1); first at {source}:2, {source}:3, {source}:4; "
                                 f"all in {out / 'dropped.jsonl'}")
    assert metrics["notice"] in logs


def test_a_utf16_file_is_named_as_not_utf8_with_its_encoding(tmp_path: Path, tokenizer_dir: Path) -> None:
    source = tmp_path / "data" / "train.jsonl"
    source.parent.mkdir()
    source.write_bytes(json.dumps(_chat("Reverse a b", "b a")).encode("utf-16"))  # with its byte-order mark
    with pytest.raises(PermanentError, match=f"data file {re.escape(str(source))} is not UTF-8 text: it looks like "
                                             "UTF-16-LE"):
        _run(tmp_path, tokenizer_dir, source)
    source.write_bytes(json.dumps(_chat("Reverse a b", "b a")).encode("utf-16-be"))  # no mark
    with pytest.raises(PermanentError, match="looks like UTF-16-BE \\(no byte-order mark\\)"):
        _run(tmp_path / "again", tokenizer_dir, source)


def test_a_line_that_is_not_utf8_is_dropped_naming_its_encoding(tmp_path: Path, tokenizer_dir: Path) -> None:
    good = json.dumps(_chat("Reverse a b", "b a")).encode()
    latin = json.dumps(_chat("Caf\u00e9 au lait, s'il vous pla\u00eet", "ok"), ensure_ascii=False).encode("cp1252")
    source = tmp_path / "data" / "train.jsonl"
    source.parent.mkdir()
    source.write_bytes(b"\n".join([good, latin, good]) + b"\n")
    metrics, out, _ = _run(tmp_path, tokenizer_dir, source)
    assert metrics["dropped_by_reason"] == {"not_utf8": 1}
    [drop] = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert drop["line"] == 2 and drop["problem"].startswith("not UTF-8 text (byte 0xe9 at column ")


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_a_bad_record_fails_the_stage_naming_file_line_and_problem(tmp_path: Path, tokenizer_dir: Path,
                                                                   reason: str) -> None:
    line, problem = BAD_LINES[reason]
    source = _jsonl(tmp_path / "data" / "train.jsonl", [json.dumps(_chat("Reverse a b", "b a")), line])
    with pytest.raises(PermanentError, match=f"{re.escape(str(source))}:2: .*{re.escape(problem)}") as error:
        _run(tmp_path, tokenizer_dir, source, "data.max_seq_len=64", "data.on_bad_record=fail")
    assert "on_bad_record: drop" in str(error.value)


def test_a_split_with_no_usable_record_fails(tmp_path: Path, tokenizer_dir: Path) -> None:
    source = _jsonl(tmp_path / "data" / "train.jsonl", ['{"text": "x"}'])
    with pytest.raises(PermanentError, match="no usable records"):
        _run(tmp_path, tokenizer_dir, source)


# -- weighted mix -------------------------------------------------------------------------------------------------


def test_mix_shares_add_up_and_draws_are_deterministic_per_seed() -> None:
    sizes, weights = [100, 50, 10], [2.0, 1.0, 1.0]
    picks, report = mix.plan(sizes, weights, seed=0)
    assert [row["taken"] for row in report] == [80, 40, 40] and sum(len(p) for p in picks) == sum(sizes)
    assert [row["with_replacement"] for row in report] == [False, False, True]
    assert [row["max_repeats"] for row in report] == [1, 1, 4]
    assert np.array_equal(picks[2], np.repeat(np.arange(10), 4))  # every document 4 times, none left out
    assert len(set(picks[0].tolist())) == 80 and picks[0].tolist() == sorted(picks[0].tolist())
    again, _ = mix.plan(sizes, weights, seed=0)
    other, _ = mix.plan(sizes, weights, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(picks, again))
    assert not np.array_equal(picks[0], other[0])
    assert mix.allocate(10, [1, 1, 1]) == [4, 3, 3]  # largest remainder; ties to the earlier source


def _mix_overrides(chat: Path, sharegpt: Path, chat_weight: float = 1, sharegpt_weight: float = 2) -> list[str]:
    return ["data.source=null", f"data.sources=[{{source: {chat}, weight: {chat_weight}}}, "
                                f"{{source: {sharegpt}, format: sharegpt, weight: {sharegpt_weight}}}]"]


def _mix_files(tmp_path: Path) -> tuple[Path, Path, list[dict[str, Any]], list[dict[str, Any]]]:
    chats = [_chat(f"Reverse {a} {b}", f"{b} {a}") for a, b in ("ab", "cd", "ef", "gh", "ij", "kl")]
    shared = [{"conversations": [{"from": "human", "value": f"Say {w}"}, {"from": "gpt", "value": w}]}
              for w in ("yes", "no", "maybe")]
    return (_jsonl(tmp_path / "chat" / "train.jsonl", chats), _jsonl(tmp_path / "sharegpt.jsonl", shared),
            chats, [{"messages": to_messages(row, "sharegpt")} for row in shared])


def test_mix_takes_each_sources_share_and_reports_replacement(tmp_path: Path, tokenizer_dir: Path,
                                                              tokenizer: Any) -> None:
    chat, sharegpt, chats, shared = _mix_files(tmp_path)
    ctx, _ = _context(tmp_path, tokenizer_dir, *_mix_overrides(chat.parent, sharegpt))
    metrics = pack.run(ctx)
    docs = [tokens for tokens, _ in _documents(PackedDataset(ctx.workdir))]
    chat_docs, shared_docs = _documents_of(chats, tokenizer), _documents_of(shared, tokenizer)
    # 9 usable documents: 1/3 from the 6 chats (3 distinct ones), 2/3 from the 3 ShareGPT records (each twice).
    assert len(docs) == 9 and metrics["samples"] == 9
    taken_chats = [d for d in docs if d in chat_docs]
    assert len(taken_chats) == 3 and len({tuple(d) for d in taken_chats}) == 3
    assert sorted(docs.count(d) for d in shared_docs) == [2, 2, 2]
    assert [(row["taken"], row["with_replacement"]) for row in metrics["mix"]] == [(3, False), (6, True)]
    assert [row["with replacement"] for row in ctx.tables["mix"]] == ["no", "yes (up to 2x)"]
    assert [row["share"] for row in ctx.tables["mix"]] == ["33.33%", "66.67%"]
    prompts = [json.loads(line) for line in (ctx.workdir / "prompts.jsonl").read_text().splitlines()]
    assert sum(row["messages"][-1]["content"].startswith("Say") for row in prompts) == 3

    again, _ = _context(tmp_path / "again", tokenizer_dir, *_mix_overrides(chat.parent, sharegpt))
    pack.run(again)
    assert [tokens for tokens, _ in _documents(PackedDataset(again.workdir))] == docs  # same data, weights, seed


def test_mix_key_follows_each_sources_content_weight_and_format(tmp_path: Path, tokenizer_dir: Path) -> None:
    chat, sharegpt, _, _ = _mix_files(tmp_path)
    inputs = _download(tokenizer_dir)

    def key(*overrides: str) -> str:
        return stage_key(pack.SPEC, load_profile("tiny-cpu", list(overrides)), inputs)

    base = key(*_mix_overrides(chat.parent, sharegpt))
    moved = tmp_path / "moved" / "train.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(chat.read_bytes())
    assert key(*_mix_overrides(moved.parent, sharegpt)) == base
    assert key(*_mix_overrides(chat.parent, sharegpt, sharegpt_weight=3)) != base
    assert key(*_mix_overrides(chat.parent, sharegpt), "data.seed=1") != base
    assert key(*_mix_overrides(chat.parent, sharegpt), "data.format=alpaca") != base  # the first source's format
    sharegpt.write_bytes(sharegpt.read_bytes().replace(b"maybe", b"maybf"))
    assert key(*_mix_overrides(chat.parent, sharegpt)) != base


def test_a_mix_source_with_no_usable_records_fails_naming_it(tmp_path: Path, tokenizer_dir: Path) -> None:
    chat, _, _, _ = _mix_files(tmp_path)
    empty = _jsonl(tmp_path / "bad.jsonl", ['{"text": "x"}'])
    ctx, _ = _context(tmp_path, tokenizer_dir, *_mix_overrides(chat.parent, empty))
    with pytest.raises(PermanentError, match=f"split 'train' of data.sources.1.source {re.escape(str(empty))} "
                                             "has no usable records"):
        pack.run(ctx)


# -- the stage as the pipeline runs it ------------------------------------------------------------------------------


def test_stage_packs_train_and_validation_and_samples_prompts(tmp_path: Path, tokenizer_dir: Path,
                                                              tokenizer: Any) -> None:
    profile = load_profile("tiny-cpu")  # the shipped embedded/data: train, validation and test files
    artifact, tables = execute_stage(pack.SPEC, profile, Store(tmp_path / "store"), _download(tokenizer_dir))
    out = Path(artifact.path)
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(meta["splits"]) == ["train", "validation"] and meta["max_seq_len"] == 256
    assert meta["pad_id"] == tokenizer.pad_token_id
    assert artifact.metrics["samples"] == 3000 and artifact.metrics["splits"]["validation"]["samples"] == 200
    assert artifact.metrics["density"] > 0.9 and artifact.metrics["tokens_per_s"] > 0
    assert [row["split"] for row in tables["pack"]] == ["train", "validation"]
    assert len(PackedDataset(out, split="validation")) == meta["splits"]["validation"]["packs"]
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len(prompts) == 1000
    for row in prompts[:20]:
        assert row["messages"][-1]["role"] == "user"
        prompt = tokenizer.apply_chat_template(row["messages"], tokenize=True, add_generation_prompt=True)
        assert row["prompt_tokens"] == len(prompt["input_ids"])
        letters = row["messages"][-1]["content"].removeprefix("Reverse the letters: ").split()
        assert row["response_tokens"] == len(letters) + 1  # one token per letter, then <|eot|>
    again, _ = execute_stage(pack.SPEC, profile, Store(tmp_path / "store"), _download(tokenizer_dir))
    assert again.key == artifact.key and again.timings == artifact.timings  # reused, not recomputed


def test_key_follows_data_content_not_its_path_or_comments(tmp_path: Path, tokenizer_dir: Path) -> None:
    rows = [_chat("Reverse a b", "b a"), _chat("Reverse c d", "d c")]
    first, moved = _jsonl(tmp_path / "one" / "train.jsonl", rows), _jsonl(tmp_path / "two" / "train.jsonl", rows)
    inputs = _download(tokenizer_dir)

    def key(source: Path, *lines: str) -> str:
        profile_file = tmp_path / "p.yaml"
        profile_file.write_text("\n".join(["extends: tiny-cpu", "data:", f"  source: {source}", *lines, ""]))
        return stage_key(pack.SPEC, load_profile(str(profile_file)), inputs)

    base = key(first.parent)
    assert key(first.parent, "# retrained nightly") == base
    assert key(moved.parent) == base
    moved.write_bytes(moved.read_bytes().replace(b"d c", b"d d"))  # one byte
    assert key(moved.parent) != base
    assert key(first.parent, "  max_seq_len: 128") != base
