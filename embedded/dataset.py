"""The embedded default's shipped dataset: reverse the letters of a short made-up word.

The task is algorithmic (attend to the prompt's letters in reverse order), so a tiny
model learns it in minutes on a CPU and generalises to words it never saw; answers are
short and deterministic, which suits exact-match evaluation. Words are random letter
strings drawn from a fixed seed, unique across all splits.

`python -m embedded.dataset` regenerates embedded/data/{train,validation,test}.jsonl
byte-identically.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import string
import tempfile
from collections.abc import Iterator

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
SEED = 1234
SPLIT_SIZES: dict[str, int] = {"train": 3000, "validation": 200, "test": 200}
MIN_LETTERS = 3
MAX_LETTERS = 6
PROMPT_PREFIX = "Reverse the letters: "


def spaced(word: str) -> str:
    """Letters separated by spaces, so each letter is its own token for any BPE."""
    return " ".join(word)


def make_example(word: str) -> dict[str, list[dict[str, str]]]:
    """One chat example for `word` in the project's messages format."""
    return {
        "messages": [
            {"role": "user", "content": PROMPT_PREFIX + spaced(word)},
            {"role": "assistant", "content": spaced(word[::-1])},
        ]
    }


def _unique_words(rng: random.Random, count: int) -> list[str]:
    """`count` distinct random lowercase words, in draw order (deterministic for a seeded rng)."""
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < count:
        length = rng.randint(MIN_LETTERS, MAX_LETTERS)
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def generate_splits(seed: int = SEED) -> dict[str, list[dict[str, list[dict[str, str]]]]]:
    """All splits, disjoint by word: one pool of unique words cut into consecutive slices."""
    rng = random.Random(seed)
    words = _unique_words(rng, sum(SPLIT_SIZES.values()))
    splits: dict[str, list[dict[str, list[dict[str, str]]]]] = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        splits[name] = [make_example(w) for w in words[start : start + size]]
        start += size
    return splits


def to_jsonl(rows: list[dict[str, list[dict[str, str]]]]) -> str:
    """Stable serialisation: one compact JSON object per line, keys in insertion order."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; shipped files are world-readable
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def write_splits(out_dir: pathlib.Path = DATA_DIR, seed: int = SEED) -> dict[str, pathlib.Path]:
    """Write every split as `<out_dir>/<split>.jsonl`; returns the paths by split name."""
    paths: dict[str, pathlib.Path] = {}
    for name, rows in generate_splits(seed).items():
        paths[name] = out_dir / f"{name}.jsonl"
        _atomic_write_text(paths[name], to_jsonl(rows))
    return paths


def split_path(split: str) -> pathlib.Path:
    """Path of a shipped split; a clear error for an unknown split name."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SIZES)}")
    return DATA_DIR / f"{split}.jsonl"


def read_split(split: str) -> Iterator[dict[str, list[dict[str, str]]]]:
    """Rows of a shipped split; a malformed line fails naming file and line number."""
    path = split_path(split)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise ValueError(f"{path}:{lineno}: expected an object with a 'messages' list")
            yield row


def main() -> None:
    for name, path in write_splits().items():
        print(f"{name}: {SPLIT_SIZES[name]} rows -> {path}")


if __name__ == "__main__":
    main()
