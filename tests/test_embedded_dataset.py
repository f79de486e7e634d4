"""The shipped dataset and the tiny tokenizer: reproducible, disjoint, Llama 4 chat format."""

from __future__ import annotations

import json
import pathlib

import pytest
from transformers import AutoTokenizer

from embedded import dataset, tokenizer


def test_dataset_generator_reproduces_shipped_files_byte_for_byte(tmp_path: pathlib.Path) -> None:
    written = dataset.write_splits(tmp_path)
    assert set(written) == {"train", "validation", "test"}
    for split, path in written.items():
        assert path.read_bytes() == dataset.split_path(split).read_bytes(), split


def test_dataset_splits_have_promised_sizes_and_are_disjoint() -> None:
    prompts = {}
    for split, size in dataset.SPLIT_SIZES.items():
        rows = list(dataset.read_split(split))
        assert len(rows) == size
        prompts[split] = {row["messages"][0]["content"] for row in rows}
        assert len(prompts[split]) == size, f"duplicate prompts inside {split}"
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]


def test_dataset_rows_are_user_assistant_chats_with_reversed_letters() -> None:
    for row in dataset.read_split("test"):
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        word = user["content"].removeprefix(dataset.PROMPT_PREFIX).replace(" ", "")
        assert word.isalpha() and word.islower()
        assert dataset.MIN_LETTERS <= len(word) <= dataset.MAX_LETTERS
        assert assistant["content"] == " ".join(reversed(word))


def test_dataset_reader_names_file_and_line_of_bad_json(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = json.dumps(dataset.make_example("abc"))
    (tmp_path / "test.jsonl").write_text(good + "\n{not json\n")
    monkeypatch.setattr(dataset, "DATA_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"test\.jsonl:2: invalid JSON"):
        list(dataset.read_split("test"))


def test_dataset_reader_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        dataset.split_path("dev")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_tokenizer(out)
    return out


def test_tokenizer_training_is_deterministic(tokenizer_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    tokenizer.save_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name


def test_tokenizer_loads_offline_with_llama4_special_tokens(tokenizer_dir: pathlib.Path) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert len(tok) == tokenizer.VOCAB_SIZE
    assert tok.bos_token == "<|begin_of_text|>"
    assert tok.eos_token == "<|eot|>"
    assert tok.pad_token == "<|finetune_right_pad|>"
    ids = tok.convert_tokens_to_ids(tokenizer.NAMED_SPECIAL_TOKENS)
    assert ids == list(range(len(tokenizer.NAMED_SPECIAL_TOKENS)))
    assert set(tokenizer.NAMED_SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert "<|reserved_special_token_0|>" in tok.all_special_tokens


@pytest.mark.parametrize("text", ["Reverse the letters: q w e", "Hello, World! 12345\n\n  tabs\tand é ü 漢字 😀"])
def test_tokenizer_round_trips_text(tokenizer_dir: pathlib.Path, text: str) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_chat_template_renders_llama4_format(tokenizer_dir: pathlib.Path) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    messages = [{"role": "user", "content": "Reverse the letters: a b c"}, {"role": "assistant", "content": "c b a"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nReverse the letters: a b c<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\nc b a<|eot|>"
    )
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nReverse the letters: a b c<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids.count(tok.bos_token_id) == 1, "chat encoding must not add a second BOS"
    assert ids[-1] == tok.convert_tokens_to_ids("<|eot|>")
    assert tok.decode(ids) == rendered
