"""QLoRA's frozen base in NF4 (torchao 0.11's ``NF4Tensor``): linear layers and routed experts.

Linear layers use torchtune's ``FrozenNF4Linear`` / ``LoRALinear(quantize_base=True)``. Routed experts are fused
3-D parameters, which torchao quantizes (and FSDP2-shards) only as tensors of at most 2 dimensions: each expert
block is stored as 2-D NF4 ``[E * in, out]`` and dequantized to the compute dtype one layer at a time, just before
the grouped matmul, into one buffer one expert at a time (torchao's own dequantization would allocate ~7x the
weight's bf16 bytes in temporaries). The dequantized copy lives only inside that call: backward dequantizes again rather than
keeping it (like torchao's ``linear_nf4``), so peak memory grows by one layer's experts, not the model's.

Measured on torch 2.13 CPU with torchao 0.11: ``to_nf4``, dequantization and ``linear_nf4`` run in fp32 and bf16,
and ``to_nf4`` of a meta tensor gives a meta ``NF4Tensor`` (the planner sizes the real quantization with it).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torchao.dtypes import nf4tensor
from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4

from llama4tune.moe import GroupedExperts, LoRAGroupedExperts, expert_matmul

BLOCK_SIZE = 64  # weights per NF4 scale (torchao's and QLoRA's default)
SCALER_BLOCK_SIZE = 256  # scales per double-quantization block, lowered to a divisor for small tensors
# FSDP2 shards an NF4 weight by splitting each of its inner tensors (codes, scales, scale factors) evenly: small
# tensors get smaller scaler blocks so that they still split over up to this many processes (any power of two).
FSDP_SPLITS = 8


def quantization_kwargs(numel: int) -> dict[str, int]:
    """``to_nf4`` block sizes for a tensor of ``numel`` elements; ValueError when NF4 cannot hold it."""
    if numel % BLOCK_SIZE:
        raise ValueError(f"QLoRA cannot quantize this model's base to NF4: a weight of {numel} elements is not a "
                         f"multiple of the NF4 block size {BLOCK_SIZE}")
    blocks = numel // BLOCK_SIZE
    scaler = math.gcd(blocks, SCALER_BLOCK_SIZE)
    while scaler > 1 and (blocks // scaler) % FSDP_SPLITS:
        scaler //= 2
    return {"block_size": BLOCK_SIZE, "scaler_block_size": scaler}


def unshardable(weight: NF4Tensor, processes: int) -> str | None:
    """Why FSDP cannot split ``weight`` over ``processes`` (torchao splits every inner tensor evenly), else None."""
    parts = {"rows": weight.shape[0], "scales": weight.n_blocks, "scale factors": weight.quantization_factor.numel(),
             "codes": weight.quantized_data.numel()}
    uneven = [f"{count} {name}" for name, count in parts.items() if count % processes]
    return f"{', '.join(uneven)} do not split over {processes} processes" if uneven else None


def quantize(tensor: torch.Tensor) -> NF4Tensor:
    """``tensor`` (at most 2-D) as NF4, with the block sizes every NF4 weight of this package uses."""
    return to_nf4(tensor.contiguous(), **quantization_kwargs(tensor.numel()))


@contextlib.contextmanager
def shape_only_quantization() -> Iterator[None]:
    """``to_nf4`` in one piece, for tensors without data (meta, fake): torchao searches the nearest code in chunks
    of CHUNK_SIZE weights to bound its temporaries, which such tensors do not have, and the chunks' ops took most of
    planning a QLoRA model (Scout: 100,800 chunks, ~3 minutes). The codes' shapes are the same either way."""
    saved, nf4tensor.CHUNK_SIZE = nf4tensor.CHUNK_SIZE, sys.maxsize
    try:
        yield
    finally:
        nf4tensor.CHUNK_SIZE = saved


def requantize_like(tensor: torch.Tensor, like: NF4Tensor) -> NF4Tensor:
    """``tensor`` reshaped to ``like``'s (2-D) shape and quantized with ``like``'s block sizes."""
    flat = tensor.to(like.dtype).reshape(like.shape).contiguous()
    return to_nf4(flat, block_size=like.block_size, scaler_block_size=like.scaler_block_size)


class _NF4ExpertMatmul(torch.autograd.Function):
    """x [T, in] (rows grouped by expert) times the experts' NF4 weight, dequantized for this call only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: NF4Tensor, counts: torch.Tensor, num_experts: int,
                use_grouped_mm: bool) -> torch.Tensor:
        ctx.save_for_backward(counts)
        ctx.weight, ctx.num_experts, ctx.use_grouped_mm = weight, num_experts, use_grouped_mm
        return expert_matmul(x, _experts(weight, num_experts, x.dtype), counts, use_grouped_mm)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (counts,) = ctx.saved_tensors
        # The base is frozen: only the input's gradient, grad @ W[e]^T per expert block.
        # A transposed view, not a copy: _grouped_mm takes column-major weights, so one layer's experts stay the
        # only dequantized copy.
        transposed = _experts(ctx.weight, ctx.num_experts, grad.dtype).transpose(1, 2)
        return expert_matmul(grad.contiguous(), transposed, counts, ctx.use_grouped_mm), None, None, None, None


def _experts(weight: NF4Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """The experts' weights ``[E, in, out]`` in ``dtype``, dequantized one expert at a time (dequantize_rows)."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    rows = weight.shape[0] // num_experts
    scales = _block_scales(weight, dtype)
    for expert in range(num_experts):
        dequantize_rows(weight, expert * rows, (expert + 1) * rows, out=out[expert * rows:(expert + 1) * rows],
                        scales=scales)
    return out.view(num_experts, rows, weight.shape[-1])


# Memory of dequantization, measured on CPU from the allocator's events (finetune/plan/allocator.py; tests/
# test_nf4_memory.py measures them again). _experts: its bf16 output (2 bytes per weight), plus per weight of ONE
# expert the byte codes as int32 indices (4 bytes per 2 weights), plus the block scales (1/32 byte per weight).
# torchao's get_original_weight (linear_nf4, the NF4 linears) allocates 14.0 bytes per weight of the whole tensor at
# once (two int64 index tensors, four half-size products, the stacked output; 33.6M bf16 weights), and to_nf4 of a
# bf16 tensor (quantizing a base tensor at load) 3.05 bytes per weight beyond its input plus a fixed ~67 MB (its
# nearest-code search runs on 1M-element chunks; 5.05 bytes per weight at 33.6M weights, 19 at 4.2M).
DEQUANTIZE_CHUNK_BYTES_PER_WEIGHT = 2
SCALE_BYTES_PER_WEIGHT = 2 / 64
TORCHAO_DEQUANTIZE_BYTES_PER_WEIGHT = 14.0
TORCHAO_QUANTIZE_BYTES_PER_WEIGHT = 3.05
TORCHAO_QUANTIZE_FIXED_BYTES = 67_000_000
# Memory traffic per weight and dequantization (by arithmetic of the kernels each runs, bf16): _experts reads the
# codes (0.5), writes and reads the int32 indices (2 + 2), writes the values (2), scales them in place (2 + 2), and
# the matmul reads them (2); get_original_weight reads the codes twice (1), writes and reads two int64 indices
# (8 + 8), writes and reads the looked-up halves, the scaled halves and the stack (3 x (2 + 2)), the matmul reads 2.
EXPERT_DEQUANTIZE_TRAFFIC_BYTES_PER_WEIGHT = 12.5
TORCHAO_DEQUANTIZE_TRAFFIC_BYTES_PER_WEIGHT = 31.0


def quantize_bytes(weights: int) -> int:
    """Peak bytes to_nf4 allocates quantizing ``weights`` bf16 weights, beyond its input."""
    return int(weights * TORCHAO_QUANTIZE_BYTES_PER_WEIGHT + TORCHAO_QUANTIZE_FIXED_BYTES)


def expert_dequantize_bytes(weights: int, num_experts: int) -> int:
    """Peak bytes _experts allocates for a bf16 dequantization of ``weights`` NF4 weights of ``num_experts``."""
    return int(weights * (2 + SCALE_BYTES_PER_WEIGHT) + weights // num_experts * DEQUANTIZE_CHUNK_BYTES_PER_WEIGHT)


def _block_scales(weight: NF4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The absmax of every 64-weight block, double quantization undone: 1/64 of a weight per weight."""
    return weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor,
                                     weight.scaler_block_size).to(dtype)


def dequantize_rows(weight: NF4Tensor, start: int, stop: int, *, out: torch.Tensor,
                    scales: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [start, stop) of a 2-D NF4 weight, dequantized into ``out`` (same values as get_original_weight).

    A lookup of each code byte in a 256 x 2 table of NF4 value pairs gives both of its weights in order; scaling
    is in place. Besides ``out`` it allocates DEQUANTIZE_CHUNK_BYTES_PER_WEIGHT per weight of the rows."""
    columns = weight.shape[-1]
    first, last = start * columns, stop * columns
    if first % weight.block_size or last % weight.block_size:
        raise ValueError(f"rows {start}:{stop} of {columns} columns do not start and end on NF4 blocks of "
                         f"{weight.block_size}")
    scales = _block_scales(weight, out.dtype) if scales is None else scales
    nf4 = weight.nf4.to(out.dtype)
    codes = torch.arange(256, device=weight.device)
    pairs = torch.stack([nf4[codes >> 4], nf4[codes & 0b1111]], dim=-1)
    packed = weight.quantized_data[first // 2:last // 2]
    torch.index_select(pairs, 0, packed.to(torch.int32), out=out.view(-1, 2))
    out.view(-1, weight.block_size).mul_(scales[first // weight.block_size:last // weight.block_size, None])
    return out


def _quantize_experts(module: GroupedExperts) -> None:
    """Replace the module's 3-D expert parameters by frozen 2-D NF4 ones (``[E * in, out]``)."""
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(module, name)
        if weight[0].numel() % BLOCK_SIZE:  # _experts dequantizes one expert at a time: experts start on blocks
            raise ValueError(f"QLoRA cannot quantize this model's routed experts to NF4: one expert's {name} has "
                             f"{weight[0].numel()} weights, not a multiple of the NF4 block size {BLOCK_SIZE}")
        flat = weight.detach().reshape(-1, weight.shape[-1])
        setattr(module, name, nn.Parameter(quantize(flat), requires_grad=False))


class NF4GroupedExperts(GroupedExperts):
    """Frozen routed experts in NF4 (no adapters)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _quantize_experts(self)

    def reset_parameters(self) -> None:
        if not isinstance(self.gate_up_proj, NF4Tensor):  # quantized weights come from the base checkpoint only
            super().reset_parameters()

    def _base(self, x: torch.Tensor, which: str, counts: torch.Tensor) -> torch.Tensor:
        return _NF4ExpertMatmul.apply(x, getattr(self, which), counts, self.num_experts, self.use_grouped_mm)


class NF4LoRAGroupedExperts(LoRAGroupedExperts, NF4GroupedExperts):
    """Routed experts with an NF4 frozen base and bf16 (train-dtype) per-expert LoRA adapters.

    The NF4 base is NF4GroupedExperts' (quantization after construction, reset_parameters, _base): in this class's
    MRO it sits between LoRAGroupedExperts and GroupedExperts, so LoRAGroupedExperts' super().__init__ builds it.
    """

    def to_empty(self, *, device: torch.device | str | int | None, recurse: bool = True) -> NF4LoRAGroupedExperts:
        # Only the adapters are materialised here (as LoRALinear does); the NF4 base is assigned when loaded.
        # swap_tensors keeps each Parameter object, which FSDP2 has registered (as nn.Module.to_empty does).
        for name in self.adapter_params():
            param = getattr(self, name)
            torch.utils.swap_tensors(param, nn.Parameter(torch.empty_like(param, device=device),
                                                         requires_grad=param.requires_grad))
        return self
