"""Packing speed and density: finetune.packed.build_packs vs torchtune.datasets.PackedDataset on the same data.

A synthetic tokenized corpus (lognormal document lengths, as in chat SFT data: many short, a long tail up to
max_seq_len; the first 20-80% of each document is prompt, masked from the loss) is generated once and given to both
in their native input form: flat numpy arrays for ours, a list of {"tokens", "labels"} dicts (what torchtune's
SFTDataset yields) for torchtune. Both produce max_seq_len rows with per-document positions and seq_lens.

    python bench/bench_pack.py [--samples 200000] [--max-seq-len 2048] [--repeats 3]

Prints medians over repeats; the last line is the tokens/s ratio (goal >= 10x) and the density of both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # torchtune's progress bar is not what we measure

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune.packed import IGNORE_INDEX, build_packs  # noqa: E402

VOCAB = 202_048  # Llama 4's vocabulary size
PAD_ID = 200_018


def make_corpus(samples: int, max_seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=5.3, sigma=0.9, size=samples), 16, max_seq_len).astype(np.int64)
    tokens = rng.integers(0, VOCAB, size=int(lengths.sum()), dtype=np.int32)
    prompt = (lengths * rng.uniform(0.2, 0.8, size=samples)).astype(np.int64)
    in_prompt = np.arange(tokens.size) - np.repeat(np.cumsum(lengths) - lengths, lengths) < np.repeat(prompt, lengths)
    labels = np.where(in_prompt, IGNORE_INDEX, tokens).astype(np.int32)
    return tokens, labels, lengths


def as_torchtune_samples(tokens: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> list[dict[str, list[int]]]:
    token_list, label_list = tokens.tolist(), labels.tolist()
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends[:-1]]
    return [{"tokens": token_list[a:b], "labels": label_list[a:b]} for a, b in zip(starts, ends)]


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        result = None  # free the previous run's output before the next one allocates
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from torchtune.datasets import PackedDataset as TorchtunePacked

    torch.set_num_threads(os.cpu_count() or 1)
    tokens, labels, lengths = make_corpus(args.samples, args.max_seq_len, args.seed)
    total = int(lengths.sum())
    print(f"corpus: {args.samples} samples, {total} tokens, length median {int(np.median(lengths))}, "
          f"p99 {int(np.percentile(lengths, 99))}, max {int(lengths.max())}; max_seq_len {args.max_seq_len}")
    samples = as_torchtune_samples(tokens, labels, lengths)

    ours_s, packed = timed(lambda: build_packs(tokens, labels, lengths, args.max_seq_len, PAD_ID), args.repeats)
    ours_packs = packed.tokens.shape[0]
    del packed
    theirs_s, theirs = timed(
        lambda: TorchtunePacked(samples, max_seq_len=args.max_seq_len, padding_idx=PAD_ID), args.repeats)
    theirs_packs = len(theirs)
    del theirs

    ours_density = total / (ours_packs * args.max_seq_len)
    theirs_density = total / (theirs_packs * args.max_seq_len)
    ours_rate, theirs_rate = total / ours_s, total / theirs_s
    for name, seconds, rate, packs, density in (("finetune.packed", ours_s, ours_rate, ours_packs, ours_density),
                                                ("torchtune", theirs_s, theirs_rate, theirs_packs, theirs_density)):
        print(f"{name:>16}: {seconds:8.3f} s  {rate / 1e6:8.2f} Mtok/s  {packs:7d} packs  "
              f"density {density:.4f}  padding {1 - density:.4f}")
    print(f"ratio tokens/s finetune.packed/torchtune = {ours_rate / theirs_rate:.1f}x (goal >= 10x); density "
          f"{ours_density:.4f} vs {theirs_density:.4f} ({ours_packs / theirs_packs:.3f}x the packs), "
          f"median of {args.repeats}")


if __name__ == "__main__":
    main()
