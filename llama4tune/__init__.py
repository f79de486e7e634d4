"""Llama 4 text decoder as torchtune components, and HF <-> torchtune weight conversion.

The builders are reached as ``llama4tune.<name>`` (recipe configs name them so: ``_component_:
llama4tune.llama4_from_hf_config``) but loaded on first use: modules that need only this package's plain parts
(tool_calls, checkpoint_pickle) do not pay for torch and torchtune.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "builders": ("LoRAOptions", "build_llama4", "llama4_decoder", "llama4_from_hf_config", "lora_llama4_decoder",
                 "lora_llama4_from_hf_config"),
    "config": ("Llama4TextArgs", "load_text_args"),
    "models": ("MAVERICK_TEXT_CONFIG", "SCOUT_TEXT_CONFIG", "TINY_TEXT_CONFIG", "llama4_maverick_17b_128e",
               "llama4_scout_17b_16e", "llama4_tiny", "lora_llama4_maverick_17b_128e", "lora_llama4_scout_17b_16e",
               "lora_llama4_tiny"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'llama4tune' has no attribute {name!r}")
    return getattr(importlib.import_module(f"llama4tune.{_MODULE_OF[name]}"), name)
