"""Calibration data for AWQ: fixed-length windows cut from the packed training tokens.

The pack stores documents back to back in rows of ``max_seq_len`` with padding after each row's last document. The
calibration stream is those documents with the padding dropped; ``samples`` windows of ``seq_len`` tokens are taken
evenly spaced over the stream (no overlap, no randomness), so the same pack always calibrates the same way and the
windows cover the whole training set rather than its first rows. Windows may cross document boundaries, as in the
usual concatenated-text calibration sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.packed import open_split
from finetune.stage import PermanentError

SPLIT = "train"


@dataclass(frozen=True)
class Calibration:
    tokens: np.ndarray
    """int64 [samples, seq_len] token ids."""
    stream_tokens: int
    """Document tokens available in the split (padding excluded)."""
    requested_samples: int
    requested_seq_len: int

    @property
    def samples(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    def stats(self) -> dict[str, Any]:
        used = self.samples * self.seq_len
        return {
            "split": SPLIT,
            "samples": self.samples,
            "seq_len": self.seq_len,
            "tokens": used,
            "requested_samples": self.requested_samples,
            "requested_seq_len": self.requested_seq_len,
            "train_tokens": self.stream_tokens,
            "train_fraction": round(used / self.stream_tokens, 6) if self.stream_tokens else 0.0,
        }


def window_starts(stream_tokens: int, samples: int, seq_len: int) -> tuple[np.ndarray, int]:
    """Start offsets of the windows and the window length actually used.

    Enough data: ``samples`` starts spread evenly over the stream (stride >= seq_len, so windows never overlap).
    Less: as many whole windows as fit, back to back. Less than one window: the whole stream as one sample.
    """
    if stream_tokens < 1:
        raise ValueError("the calibration stream is empty")
    if stream_tokens < seq_len:
        return np.zeros(1, dtype=np.int64), stream_tokens
    fit = stream_tokens // seq_len
    if fit < samples:
        return np.arange(fit, dtype=np.int64) * seq_len, seq_len
    return np.linspace(0, stream_tokens - seq_len, samples).astype(np.int64), seq_len


def load_calibration(pack_dir: Path, samples: int, seq_len: int) -> Calibration:
    """``samples`` x ``seq_len`` calibration tokens from the pack artifact at ``pack_dir`` (its train split)."""
    try:
        data = open_split(pack_dir, SPLIT)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise PermanentError(f"pack artifact {pack_dir}: {exc}") from exc
    # Document tokens of pack i occupy tokens[i, :used[i]]; the rest of the row is padding.
    doc_ends = np.cumsum(np.asarray(data.seq_lens, dtype=np.int64))
    offsets = np.asarray(data.pack_offsets, dtype=np.int64)
    used = np.diff(np.r_[0, doc_ends][offsets])
    row_starts = np.r_[0, np.cumsum(used)]
    stream_tokens = int(row_starts[-1])
    if stream_tokens == 0:
        raise PermanentError(f"pack artifact {pack_dir}: split '{SPLIT}' holds no tokens to calibrate with")
    starts, length = window_starts(stream_tokens, samples, seq_len)
    positions = (starts[:, None] + np.arange(length, dtype=np.int64)[None, :]).ravel()
    rows = np.searchsorted(row_starts, positions, side="right") - 1
    columns = positions - row_starts[rows]
    tokens = np.asarray(data.tokens[rows, columns], dtype=np.int64).reshape(len(starts), length)
    return Calibration(tokens=tokens, stream_tokens=stream_tokens, requested_samples=samples,
                       requested_seq_len=seq_len)
