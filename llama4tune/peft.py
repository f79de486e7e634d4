"""PEFT LoRA adapters from llama4tune adapter tensors: the one exporter behind both final checkpoint formats (the
checkpointer writes it beside an HF-format final checkpoint; convert writes it from a DCP one).

``target_modules`` lists the exact module names adapted, so PEFT adapts nothing else: a suffix such as ``q_proj``
would also match a multimodal base's vision tower, and ``gate_proj`` the shared expert as well as a dense MLP.
Routed-expert adapters (``<m>.lora_gate_up_a`` ...) adapt fused 3-D parameters, which PEFT's LoRA layers do not
wrap: they have no PEFT form, and a profile asking for both is refused before training (finetune/profile.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

_LINEAR_ADAPTER = re.compile(r"\.lora_[ab]\.weight$")
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class NoPeftForm(ValueError):
    """Adapter tensors that PEFT's LoRA cannot express (routed-expert adapters, DoRA magnitudes)."""


def peft_adapter(
    adapter: Mapping[str, torch.Tensor],
    peft_key: Callable[[str], str],
    rank: int,
    alpha: float,
    *,
    dropout: float = 0.0,
    base_model_name_or_path: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(``adapter_model.safetensors`` tensors, ``adapter_config.json`` content) for llama4tune adapter tensors keyed
    by our names; ``peft_key`` maps one of our keys to PEFT's (``base_model.model.<hf module>.lora_A.weight``)."""
    other = sorted(key for key in adapter if not _LINEAR_ADAPTER.search(key))
    if other:
        raise NoPeftForm(f"adapter tensors {other[:3]} have no PEFT LoRA form (routed-expert adapters adapt fused "
                         "3-D expert weights)")
    weights = {peft_key(key): tensor.contiguous() for key, tensor in adapter.items()}
    targets = sorted({key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in weights})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    return weights, config
