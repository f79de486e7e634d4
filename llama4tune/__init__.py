"""Llama 4 text decoder as torchtune components, and HF <-> torchtune weight conversion."""

from llama4tune.builders import (
    LoRAOptions,
    build_llama4,
    llama4_decoder,
    llama4_from_hf_config,
    lora_llama4_decoder,
    lora_llama4_from_hf_config,
)
from llama4tune.config import Llama4TextArgs, load_text_args
from llama4tune.models import (
    MAVERICK_TEXT_CONFIG,
    SCOUT_TEXT_CONFIG,
    llama4_maverick_17b_128e,
    llama4_scout_17b_16e,
    llama4_tiny,
    lora_llama4_maverick_17b_128e,
    lora_llama4_scout_17b_16e,
    lora_llama4_tiny,
)

__all__ = [
    "LoRAOptions",
    "Llama4TextArgs",
    "MAVERICK_TEXT_CONFIG",
    "SCOUT_TEXT_CONFIG",
    "build_llama4",
    "llama4_decoder",
    "llama4_from_hf_config",
    "llama4_maverick_17b_128e",
    "llama4_scout_17b_16e",
    "llama4_tiny",
    "load_text_args",
    "lora_llama4_decoder",
    "lora_llama4_from_hf_config",
    "lora_llama4_maverick_17b_128e",
    "lora_llama4_scout_17b_16e",
    "lora_llama4_tiny",
]
