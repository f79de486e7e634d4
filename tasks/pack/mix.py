"""A weighted mix of sources (``data.sources``): each source's share of the packed training documents of an epoch.

An epoch holds as many documents as the sources' usable documents together; a source's share of them is its weight
over the sum of the weights, rounded to whole documents by largest remainder so the counts add up exactly. A source
with at least its share of documents gives that many distinct ones; a source with fewer gives every document
``share // size`` times and draws the rest without replacement (reported as "with replacement"). The draws come
from numpy generators seeded with (``data.seed``, the source's position), so the same data, weights and seed give
the same mix; the drawn documents keep their data order (the trainer shuffles packs).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def allocate(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` into whole counts that add up to it (largest remainder)."""
    exact = np.asarray(weights, dtype=np.float64) / float(sum(weights)) * total
    counts = np.floor(exact).astype(np.int64)
    # Ties go to the earlier source: the result depends on nothing but the inputs.
    counts[np.argsort(counts - exact, kind="stable")[: total - int(counts.sum())]] += 1
    return counts.tolist()


def draw(available: int, count: int, seed: int, position: int) -> np.ndarray:
    """Indices of ``count`` documents out of ``available``, in data order; each repeated as often as needed."""
    repeats, rest = divmod(count, available)
    rng = np.random.default_rng([seed, position])
    extra = rng.choice(available, size=rest, replace=False)
    return np.sort(np.concatenate([np.tile(np.arange(available), repeats), extra]))


def plan(sizes: Sequence[int], weights: Sequence[float], seed: int) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Each source's drawn document indices and its report row: documents available and taken, share, repeats."""
    counts = allocate(sum(sizes), weights)
    picks = [draw(size, count, seed, position) for position, (size, count) in enumerate(zip(sizes, counts))]
    total_weight = float(sum(weights))
    report = [{"weight": weight, "share": round(weight / total_weight, 6), "available": size, "taken": count,
               "with_replacement": count > size, "max_repeats": -(-count // size)}
              for size, count, weight in zip(sizes, counts, weights)]
    return picks, report


def sample_rows(rows: Sequence[Sequence[T]], weights: Sequence[float], total: int, seed: int) -> list[T]:
    """Up to ``total`` rows drawn from each source's rows in proportion to its weight, without repeats."""
    rng = random.Random(seed)
    out: list[T] = []
    for source_rows, count in zip(rows, allocate(total, weights)):
        chosen = sorted(rng.sample(range(len(source_rows)), min(count, len(source_rows))))
        out += [source_rows[index] for index in chosen]
    return out
