"""QLoRA: the NF4 parameters of the base, read and quantized one tensor at a time.

The plain (bf16/fp32) base weights go through tunerecipes/base_weights.py; an NF4 parameter cannot be filled in
place (``to_empty`` leaves part of its inner tensors on meta), so each one is read whole from its safetensors file,
reshaped to the parameter's 2-D storage (routed experts ``[E, in, out]`` -> ``[E * in, out]``), quantized with the
parameter's block sizes and assigned. A process holds at most one base tensor in its compute dtype outside the
model, so the base never sits whole in host RAM (Scout is ~218 GB in bf16).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import training

from llama4tune.nf4 import requantize_like, unshardable


def nf4_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's NF4 parameters (plain, or the local tensor of an FSDP shard)."""
    return {name for name, param in model.state_dict(keep_vars=True).items()
            if isinstance(getattr(param, "_local_tensor", param), NF4Tensor)}


def check_shardable(model: nn.Module, processes: int) -> None:
    """ValueError naming the first NF4 weight FSDP cannot split over ``processes`` (checked before sharding)."""
    for name, param in model.state_dict(keep_vars=True).items():
        if isinstance(param, NF4Tensor) and (reason := unshardable(param, processes)):
            raise ValueError(f"QLoRA with FSDP over {processes} processes: NF4 weight {name}: {reason}")


def load(model: nn.Module, index: Mapping[str, tuple[Path, str]], keys: set[str], device: torch.device, *,
         distributed: bool, cpu_offload: bool) -> None:
    """Quantize base tensors ``keys`` (tune key -> (file, key) in ``index``) into ``model``'s NF4 parameters."""
    params = {name: param for name, param in model.state_dict(keep_vars=True).items() if name in keys}
    shapes = {name: param.shape for name, param in params.items()}
    for name in sorted(keys):
        path, key = index[name]
        with safe_open(str(path), framework="pt") as handle:
            stored = handle.get_tensor(key)
        if stored.numel() != shapes[name].numel():
            raise ValueError(f"base tensor {key} in {path.name} has shape {tuple(stored.shape)}, which the model's "
                             f"{name} {tuple(shapes[name])} cannot hold: the checkpoint and the model config differ")
        if distributed:
            # torchtune quantizes the full tensor and keeps this rank's rows as an NF4 shard (FSDP2's layout).
            training.load_from_full_model_state_dict(model, {name: stored.reshape(shapes[name])}, device,
                                                     strict=False, cpu_offload=cpu_offload)
        else:
            quantized = requantize_like(stored.to(device), params[name])
            # swap_tensors keeps the Parameter object the module (and its optimizer filter) holds.
            torch.utils.swap_tensors(params[name], nn.Parameter(quantized, requires_grad=False))
        del stored
