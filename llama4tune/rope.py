"""Interleaved rotary embeddings for Llama 4, with optional llama3 frequency scaling.

Llama 4 rotates interleaved pairs (x[2i], x[2i+1]) like Meta's reference code (and torchtune's
RotaryPositionalEmbeddings), but Scout ships llama3-style scaling with equal low/high band factors,
which torchtune's Llama3ScaledRoPE cannot express (it divides by their difference), so the inverse
frequencies are computed here exactly as transformers does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def llama4_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32 (transformers' default / llama3 rope init)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    # Medium band only exists when low != high; torch.where discards the 0/0 of the empty band.
    smooth = (old_len / wavelen - low) / (high - low) if high != low else torch.zeros_like(wavelen)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class Llama4RoPE(nn.Module):
    """Applies interleaved RoPE to [b, s, n_heads, head_dim] given positions [b, s] (or [s])."""

    def __init__(self, head_dim: int, theta: float = 500000.0, scaling: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = dict(scaling) if scaling else None
        self.rope_init()

    def rope_init(self) -> None:
        # Recipes that build on the meta device call rope_init() after materialising the model.
        self.register_buffer("inv_freq", llama4_inv_freq(self.head_dim, self.theta, self.scaling), persistent=False)

    def forward(self, x: torch.Tensor, *, input_pos: torch.Tensor) -> torch.Tensor:
        # Angles in fp32 whatever the activation dtype (as transformers does).
        freqs = input_pos.to(torch.float32)[..., None] * self.inv_freq.float()
        if freqs.dim() == 2:
            freqs = freqs[None]
        cos, sin = freqs.cos()[:, :, None, :], freqs.sin()[:, :, None, :]
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
        return out.flatten(-2).type_as(x)
