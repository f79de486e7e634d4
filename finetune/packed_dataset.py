"""The torch Dataset that feeds a pack artifact (finetune/packed.py's format) to torchtune recipes.

``PackedDataset(path, split)`` yields what ``torchtune.datasets.PackedDataset`` yields (tokens, labels, input_pos,
seq_lens; the padding counted as one last sequence) so ``torchtune.data.padded_collate_packed`` builds the
block-causal mask that keeps attention inside each document. ``input_pos`` restarts at 0 in every document.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import Dataset

from finetune.packed import open_split


class PackedDataset(Dataset):
    """Packs of one split, read memory-mapped; items are what torchtune's own PackedDataset yields.

    Use it as a torchtune ``dataset._component_`` with keyword arguments, together with ``packed: True`` (which
    torchtune recipes read to pick ``padded_collate_packed``)::

        dataset: {_component_: finetune.packed_dataset.PackedDataset, path: /store/pack/<key>, split: train, packed: True}
    """

    def __init__(self, path: str | os.PathLike[str], split: str = "train", packed: bool = True) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be the pack artifact directory, got {type(path).__name__}; "
                            "instantiate with keyword arguments only (no tokenizer)")
        if not packed:
            raise ValueError("finetune.packed_dataset.PackedDataset is always packed; drop 'packed: False'")
        self.packed = True  # torchtune recipes read this to pick padded_collate_packed
        self.stored = open_split(path, split)

    def __len__(self) -> int:
        return int(self.stored.tokens.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"pack {index} out of range ({len(self)} packs)")
        index %= len(self)
        stored = self.stored
        lengths = np.asarray(stored.seq_lens[stored.pack_offsets[index]:stored.pack_offsets[index + 1]], dtype=np.int64)
        padding = stored.max_seq_len - int(lengths.sum())
        if padding:
            lengths = np.append(lengths, padding)  # torchtune counts the padding as one more sequence
        return {
            "tokens": torch.from_numpy(stored.tokens[index].astype(np.int64)),
            "labels": torch.from_numpy(stored.labels[index].astype(np.int64)),
            "input_pos": torch.from_numpy(positions(lengths)),
            "seq_lens": torch.from_numpy(lengths),
        }


def positions(lengths: np.ndarray) -> np.ndarray:
    """Position of every token inside its own sequence: 0, 1, ... restarting at each sequence."""
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
