"""preference_accuracy: how often a model prefers the chosen response of a held-out preference pair.

The pairs are the pack artifact's validation split (tasks/pack/preference.py: chosen, rejected, back to back in
packs), tokenized once with the model's chat template exactly as training saw them. For each sequence the response is
scored as a continuation of its prompt: the summed log-probability (not length-normalized) of every token from the
first learned one (the response's) to the last, through the lm-eval model already loaded for the tasks (``hf`` or a
served model), so no second copy of the weights is loaded. A pair counts 1 when chosen scores higher, 0.5 on a tie.

The result is reported as an lm-eval-shaped task, ``preference`` (metric ``preference_accuracy``), beside the
profile's tasks: the comparison table and the gate (``require_rise: {task: preference, ...}``) read it like any other.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from finetune.packed import IGNORE_INDEX, open_split
from finetune.stage import PermanentError

TASK = "preference"
METRIC = "preference_accuracy"
SPLIT = "validation"


def pairs(pack_dir: str, limit: int | None = None) -> list[tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]]]:
    """Each validation pair as ((chosen context, chosen response), (rejected context, rejected response)) token ids."""
    try:
        stored = open_split(pack_dir, SPLIT)
    except KeyError:
        raise PermanentError(f"{pack_dir}: the preference data has no validation split to measure "
                             f"{METRIC} on (add validation.jsonl beside train.jsonl)") from None
    sequences = []
    for pack in range(stored.tokens.shape[0]):
        lengths = stored.seq_lens[stored.pack_offsets[pack]:stored.pack_offsets[pack + 1]]
        tokens, labels = np.asarray(stored.tokens[pack]), np.asarray(stored.labels[pack])
        start = 0
        for length in lengths.tolist():
            learned = np.flatnonzero(labels[start:start + length] != IGNORE_INDEX)
            seq = tokens[start:start + length].tolist()
            # The response: first learned token to the last; its context: everything before.
            first, last = int(learned[0]), int(learned[-1])
            sequences.append((seq[:first], seq[first:last + 1]))
            start += length
    found = list(zip(sequences[0::2], sequences[1::2]))
    return found[:limit] if limit else found


def accuracy(lm: Any, pack_dir: str, limit: int | None = None) -> dict[str, Any]:
    """preference_accuracy of the lm-eval model ``lm`` on the validation pairs, with its standard error."""
    found = pairs(pack_dir, limit)
    if not found:
        raise PermanentError(f"{pack_dir}: the validation split holds no preference pairs")
    requests = [(("", ""), context, response) for pair in found for context, response in pair]
    scores = [logprob for logprob, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]
    chosen, rejected = np.array(scores[0::2]), np.array(scores[1::2])
    wins = preference_wins(chosen, rejected)
    value = float(wins.mean())
    return {"value": value, "stderr": math.sqrt(value * (1 - value) / len(wins)), "pairs": len(wins),
            "mean_margin": float((chosen - rejected).mean())}


def preference_wins(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """Per pair: 1 when the chosen response scores higher, 0.5 on a tie, else 0."""
    return np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))


def add_to_results(results: dict[str, Any], measured: dict[str, Any]) -> None:
    """Report ``measured`` in lm-eval's results layout as task ``preference``."""
    results.setdefault("results", {})[TASK] = {
        "alias": TASK, f"{METRIC},none": measured["value"], f"{METRIC}_stderr,none": measured["stderr"]}
    results.setdefault("higher_is_better", {})[TASK] = {METRIC: True}
    results.setdefault("n-samples", {})[TASK] = {"original": measured["pairs"], "effective": measured["pairs"]}
