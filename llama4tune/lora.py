"""Merging LoRA adapters of a llama4tune model into base weights, and PEFT adapter export.

torchtune's `get_merged_lora_ckpt` handles LoRALinear (`<m>.lora_a.weight` / `<m>.lora_b.weight`)
but not our per-expert adapters (`<m>.experts.lora_gate_up_a` ...), which it would mistake for
LoRALinear modules. `merge_lora_state_dict` handles both and is the merge to use for this model;
it only needs each module's base and adapter tensors to be in the same dict, so a streaming
converter can call it one layer at a time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from llama4tune.convert import tune_to_peft_key

_LINEAR_A = re.compile(r"^(.+)\.lora_a\.weight$")
_EXPERT_A = re.compile(r"^(.+)\.lora_(gate_up|down)_a$")
# Our module names -> HF module names that PEFT's target_modules matches by suffix.
_PEFT_TARGETS = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj",
                 "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj", "output": "lm_head"}  # fmt: skip


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


def adapter_to_peft(adapter_state_dict: Mapping[str, torch.Tensor], multimodal_prefix: bool = False) -> dict[str, torch.Tensor]:
    """torchtune adapter weights (LoRALinear only) -> PEFT `adapter_model.safetensors` keys."""
    return {tune_to_peft_key(k, multimodal_prefix): v for k, v in adapter_state_dict.items()}


def peft_adapter_config(adapter_config: Mapping[str, Any], base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """PEFT `adapter_config.json` content from the adapter config torchtune's LoRA recipes save.

    `adapter_config` has `r`, `lora_alpha` and torchtune module names in `target_modules` (q_proj,
    output_proj, w1, w2, w3, output). gate/up/down_proj then match both the dense MLPs and the shared
    experts (PEFT matches name suffixes): exactly what apply_lora_to_mlp adapts.
    """
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in adapter_config]
    if missing:
        raise KeyError(f"adapter config is missing {missing}")
    unknown = [m for m in adapter_config["target_modules"] if m not in _PEFT_TARGETS]
    if unknown:
        raise ValueError(f"adapter config target_modules {unknown} have no PEFT equivalent")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter_config["r"],
        "lora_alpha": adapter_config["lora_alpha"],
        "lora_dropout": adapter_config.get("lora_dropout", 0.0),
        "target_modules": sorted({_PEFT_TARGETS[m] for m in adapter_config["target_modules"]}),
        "bias": "none",
        "base_model_name_or_path": base_model_name_or_path,
    }


def validate_base_load(model: torch.nn.Module, missing: Sequence[str], unexpected: Sequence[str]) -> None:
    """Checks `model.load_state_dict(base, strict=False)` left only adapter parameters unloaded.

    torchtune's validate_missing_and_unexpected_for_lora only knows LoRALinear names; this also
    accepts expert adapters and a trainable router (whatever get_adapter_params reports).
    """
    from torchtune.modules.peft import get_adapter_params

    adapter = set(get_adapter_params(model))
    not_adapter = [k for k in missing if k not in adapter]
    if not_adapter or unexpected:
        raise KeyError(f"base checkpoint mismatch: missing non-adapter keys {not_adapter[:5]}, unexpected {list(unexpected)[:5]}")
