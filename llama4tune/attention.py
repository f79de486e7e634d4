"""Llama 4 self-attention: GQA with per-layer RoPE + chunked local attention, or NoPE + global
attention with attention-temperature tuning.

torchtune's MultiHeadAttention cannot express Llama 4: the local layers need a chunk mask built
from positions, and the NoPE layers scale queries by a position-dependent temperature. This module
keeps torchtune's calling convention (`attn(x, y, mask=..., input_pos=...)`) so it plugs into
`TransformerSelfAttentionLayer` / `TransformerDecoder`, recipes' activation checkpointing and FSDP
wrapping unchanged.

Masks: `mask` is torchtune's bool mask [b, s, s] (True = may attend), e.g. the block-causal mask of
a packed batch, or a flex-attention BlockMask (what torchtune's packed collate returns on CUDA), or
None (plain causal). Chunks are taken from `input_pos`, which restarts at each packed document, so a
packed document sees exactly the chunks it would see alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # BlockMask exists on every torch we support; guard keeps import-time errors readable.
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover
    BlockMask = None  # type: ignore[assignment,misc]


class Llama4QKNorm(nn.Module):
    """Weightless RMS normalisation of q/k over head_dim ("L2 norm" in Llama 4), computed in fp32."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def default_positions(input_pos: torch.Tensor | None, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """Positions [b, s]: `input_pos` broadcast to the batch, or 0..s-1 when absent."""
    if input_pos is None:
        return torch.arange(seq_len, device=device)[None].expand(batch, seq_len)
    if input_pos.dim() == 1:
        input_pos = input_pos[None]
    return input_pos.expand(batch, seq_len)


def temperature_scales(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Llama 4 NoPE query temperature: 1 + attn_scale * log1p(floor((pos + 1) / floor_scale)), fp32."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


class Llama4Attention(nn.Module):
    """GQA self-attention of one Llama 4 layer.

    Args:
        embed_dim, num_heads, num_kv_heads, head_dim: attention shape.
        q_proj, k_proj, v_proj, output_proj: projections (nn.Linear or LoRALinear).
        pos_embeddings: RoPE module for RoPE layers, None for NoPE layers.
        qk_norm: applied to q and k after RoPE (RoPE layers with use_qk_norm), else None.
        attention_chunk_size: chunked local attention window for RoPE layers, None for global layers.
        attn_temperature_tuning, floor_scale, attn_scale: NoPE query temperature (HF semantics).
        attn_dropout: attention-probability dropout in training.
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        output_proj: nn.Module,
        pos_embeddings: nn.Module | None = None,
        qk_norm: nn.Module | None = None,
        attention_chunk_size: int | None = None,
        attn_temperature_tuning: bool = False,
        floor_scale: float = 8192.0,
        attn_scale: float = 0.1,
        attn_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if attention_chunk_size is not None and attention_chunk_size <= 0:
            raise ValueError(f"attention_chunk_size must be positive, got {attention_chunk_size}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.output_proj = output_proj
        self.pos_embeddings = pos_embeddings
        self.qk_norm = qk_norm
        self.attention_chunk_size = attention_chunk_size
        self.attn_temperature_tuning = attn_temperature_tuning
        self.floor_scale = float(floor_scale)
        self.attn_scale = float(attn_scale)
        self.attn_dropout = attn_dropout
        # torchtune's decoder asks every layer about KV caches; these components are for training.
        self.kv_cache = None
        self.cache_enabled = False

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int) -> None:
        raise NotImplementedError(
            "KV-cache decoding is not implemented for the llama4tune training components; "
            "generate with the converted Hugging Face checkpoint (transformers / vLLM) instead."
        )

    def reset_cache(self) -> None:
        raise RuntimeError("Key value caches are not setup. Call model.setup_caches() first.")

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | BlockMask | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if y is not None and y is not x:
            raise ValueError("Llama4Attention is self-attention only: y must be None or x")
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        pos = default_positions(input_pos, b, s, x.device)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=pos)
            k = self.pos_embeddings(k, input_pos=pos)
        if self.qk_norm is not None:
            q = self.qk_norm(q)
            k = self.qk_norm(k)
        if self.attn_temperature_tuning and self.pos_embeddings is None:
            scales = temperature_scales(pos, self.floor_scale, self.attn_scale)
            q = (q * scales[:, :, None, None]).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.num_heads != self.num_kv_heads:
            # Query head h reads kv head h // group, the same grouping as HF's repeat_kv.
            group = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = self._attend(q, k, v, mask, pos)
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | BlockMask | None,
        pos: torch.Tensor,
    ) -> torch.Tensor:
        dropout = self.attn_dropout if self.training else 0.0
        scale = self.head_dim**-0.5
        chunk = self.attention_chunk_size
        if BlockMask is not None and isinstance(mask, BlockMask):
            return self._flex(q, k, v, mask, pos, dropout)
        if mask is None and chunk is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale)
        s = q.shape[2]
        if mask is None:
            mask = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()[None]
        elif mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor [b, s, s] (True = attend), got dtype {mask.dtype}")
        if chunk is not None:
            block = torch.div(pos, chunk, rounding_mode="floor")
            mask = mask & (block[:, :, None] == block[:, None, :])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=dropout, scale=scale)

    def _flex(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, pos: torch.Tensor, dropout: float
    ) -> torch.Tensor:
        if dropout > 0.0:
            raise ValueError("flex attention (BlockMask) does not support attention dropout; set attn_dropout=0")
        chunk = self.attention_chunk_size
        if chunk is not None:
            doc_mod = mask.mask_mod
            block = torch.div(pos, chunk, rounding_mode="floor")

            def chunked_doc_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 - flex mask_mod signature
                return doc_mod(b, h, q_idx, kv_idx) & (block[b, q_idx] == block[b, kv_idx])

            s = q.shape[2]
            mask = create_block_mask(chunked_doc_mod, q.shape[0], None, s, s, device=q.device)
        if q.is_cuda:
            # torchtune's compiled flex attention (only defined when CUDA flex is supported).
            from torchtune.modules.attention_utils import compile_friendly_flex_attention

            return compile_friendly_flex_attention(q, k, v, block_mask=mask)
        return flex_attention(q, k, v, block_mask=mask, scale=self.head_dim**-0.5)
