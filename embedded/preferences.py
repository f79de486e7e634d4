"""The embedded default's preference pairs (``embedded/preferences``): what DPO, not SFT, has to teach.

Each prompt is the SFT task's (reverse a word's letters) with a sign-off the answer must end with, ``X`` or ``Y``
after a newline; the chosen response signs as asked, the rejected one with the other letter. Both reverse the word
correctly, so the pair differs only in the one thing the SFT data never shows: a base or SFT model prefers either
response about half the time (the two sign-offs are equally frequent), DPO learns to follow the request, and the
reversed letters before the newline (all that the exact-match task reads) are the same in both.

Half the records use the explicit shape with strings, half the implicit one (TRL / UltraFeedback-binarized: whole
conversations sharing the prompt), so the shipped data exercises both. ``python -m embedded.preferences`` regenerates
the files byte-identically.
"""

from __future__ import annotations

import pathlib
import random
from typing import Any

from embedded.dataset import PROMPT_PREFIX, _atomic_write_text, _unique_words, spaced, to_jsonl

DATA_DIR = pathlib.Path(__file__).resolve().parent / "preferences"
SEED = 4321
SPLIT_SIZES: dict[str, int] = {"train": 400, "validation": 100}
SIGNS = ("X", "Y")


def make_pair(word: str, sign: str, implicit: bool) -> dict[str, Any]:
    other = SIGNS[1 - SIGNS.index(sign)]
    prompt = f"{PROMPT_PREFIX}{spaced(word)}\nSign with {sign}"
    chosen, rejected = (f"{spaced(word[::-1])}\n{s}" for s in (sign, other))
    if not implicit:
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    user = {"role": "user", "content": prompt}
    return {"chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}]}


def generate_splits(seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(seed)
    words = _unique_words(rng, sum(SPLIT_SIZES.values()))
    splits: dict[str, list[dict[str, Any]]] = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        # Equal numbers of each sign-off, in a seeded order, so a model biased towards one letter scores 0.5.
        signs = [SIGNS[i % 2] for i in range(size)]
        rng.shuffle(signs)
        splits[name] = [make_pair(word, sign, implicit=i % 2 == 1)
                        for i, (word, sign) in enumerate(zip(words[start:start + size], signs))]
        start += size
    return splits


def main() -> None:
    for name, rows in generate_splits().items():
        path = DATA_DIR / f"{name}.jsonl"
        _atomic_write_text(path, to_jsonl(rows))
        print(f"{name}: {len(rows)} pairs -> {path}")


if __name__ == "__main__":
    main()
