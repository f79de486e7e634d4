"""Merging LoRA adapters of a llama4tune model into base weights (PEFT export is llama4tune/peft.py).

torchtune's `get_merged_lora_ckpt` handles LoRALinear (`<m>.lora_a.weight` / `<m>.lora_b.weight`)
but not our per-expert adapters (`<m>.experts.lora_gate_up_a` ...), which it would mistake for
LoRALinear modules. `merge_lora_state_dict` handles both and is the merge to use for this model;
it only needs each module's base and adapter tensors to be in the same dict, so a streaming
converter can call it one layer at a time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

_LINEAR_A = re.compile(r"^(.+)\.lora_a\.weight$")
_EXPERT_A = re.compile(r"^(.+)\.lora_(gate_up|down)_a$")


def merge_linear_lora(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int, alpha: float) -> torch.Tensor:
    """W + (alpha / rank) * B @ A for a LoRALinear ([out, in] weights), computed in fp32, cast back."""
    delta = (alpha / rank) * (lora_b.float() @ lora_a.float())
    return (base.float() + delta).to(base.dtype)


def merge_expert_lora(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int, alpha: float) -> torch.Tensor:
    """W[e] + (alpha / rank) * A[e] @ B[e] for fused expert weights ([E, in, out])."""
    delta = (alpha / rank) * torch.bmm(lora_a.float(), lora_b.float())
    return (base.float() + delta).to(base.dtype)


def merge_lora_state_dict(state_dict: Mapping[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """New state dict with every LoRA adapter folded into its base weight and adapter keys removed.

    Raises KeyError naming the module when an adapter's base or partner tensor is missing.
    """
    out = dict(state_dict)
    for key in list(state_dict):
        if (m := _LINEAR_A.match(key)) is not None:
            module = m.group(1)
            base_key, b_key = f"{module}.weight", f"{module}.lora_b.weight"
            _require(state_dict, (base_key, b_key), module)
            out[base_key] = merge_linear_lora(state_dict[base_key], state_dict[key], state_dict[b_key], rank, alpha)
            del out[key], out[b_key]
        elif (m := _EXPERT_A.match(key)) is not None:
            module, which = m.groups()
            base_key, b_key = f"{module}.{which}_proj", f"{module}.lora_{which}_b"
            _require(state_dict, (base_key, b_key), module)
            out[base_key] = merge_expert_lora(state_dict[base_key], state_dict[key], state_dict[b_key], rank, alpha)
            del out[key], out[b_key]
    leftover = [k for k in out if "lora_" in k or k.endswith(".magnitude")]
    if leftover:
        raise KeyError(f"adapter tensors without a matching lora_a/base weight: {leftover[:5]}")
    return out


def _require(state_dict: Mapping[str, torch.Tensor], keys: Sequence[str], module: str) -> None:
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise KeyError(f"LoRA module {module!r}: missing {missing} in the state dict")
