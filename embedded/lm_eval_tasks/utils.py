"""Data and choices for the embedded default's lm-eval tasks.

lm-eval imports this file by path (``!function utils.<name>`` in the YAMLs beside it), so it resolves the data files
a YAML names (``dataset_kwargs.data_files``) against its own directory rather than the working directory.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import datasets

HERE = pathlib.Path(__file__).resolve().parent
NUM_CHOICES = 4


def _prompt_answer(path: pathlib.Path, line_no: int, line: str) -> dict[str, str]:
    try:
        messages = json.loads(line)["messages"]
        user = next(m["content"] for m in messages if m["role"] == "user")
        answer = next(m["content"] for m in messages if m["role"] == "assistant")
    except (ValueError, KeyError, TypeError, StopIteration) as exc:
        raise ValueError(f"{path}:{line_no}: not a chat record with a user and an assistant turn ({exc!r})") from exc
    return {"prompt": user, "answer": answer}


def load_chat_splits(data_files: dict[str, str], **_: Any) -> datasets.DatasetDict:
    """Chat JSONL splits ({"messages": [user, assistant]}) as prompt/answer rows. lm-eval also passes the task's
    metadata as keyword arguments: unused."""
    splits = {}
    for split, name in data_files.items():
        path = HERE / name
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [_prompt_answer(path, i, line) for i, line in enumerate(lines, start=1) if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


def _distractors(answer: str) -> list[str]:
    """Wrong answers that look like the right one: the unreversed word, swapped and rotated letters, then
    single-letter substitutions (always different, so even 'a a a' gets enough distinct choices)."""
    letters = answer.split(" ")
    candidates = [
        letters[::-1],
        letters[1:2] + letters[:1] + letters[2:],
        letters[:-2] + letters[-1:] + letters[-2:-1],
        letters[1:] + letters[:1],
        letters[-1:] + letters[:-1],
    ]
    candidates += [
        letters[:i] + [chr((ord(letters[i]) - ord("a") + 1) % 26 + ord("a"))] + letters[i + 1 :]
        for i in range(len(letters))
    ]
    out: list[str] = []
    for candidate in (" ".join(c) for c in candidates):
        if candidate != answer and candidate not in out:
            out.append(candidate)
    return out[: NUM_CHOICES - 1]


def gold_index(doc: dict[str, str]) -> int:
    """Where the right answer sits: spread over positions, so a model that scores all choices alike gets chance."""
    return sum(map(ord, doc["answer"])) % NUM_CHOICES


def choices(doc: dict[str, str]) -> list[str]:
    options = _distractors(doc["answer"])
    options.insert(gold_index(doc), doc["answer"])
    return options
