"""Architectures of the production base models, by hub repo id, for planning on a machine that has not
downloaded them (the hub's Llama 4 repos are gated: their config.json needs a token and an accepted licence).

Used only when the profile's config cannot be read locally; the plan says which one it used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llama4tune.models import MAVERICK_TEXT_CONFIG, SCOUT_TEXT_CONFIG

# Text configs as published in each repo's config.json (text_config); llama4tune.models holds the numbers.
TEXT_CONFIGS: dict[str, Mapping[str, Any]] = {
    "meta-llama/Llama-4-Scout-17B-16E": SCOUT_TEXT_CONFIG,
    "meta-llama/Llama-4-Scout-17B-16E-Instruct": SCOUT_TEXT_CONFIG,
    "meta-llama/Llama-4-Maverick-17B-128E": MAVERICK_TEXT_CONFIG,
    "meta-llama/Llama-4-Maverick-17B-128E-Instruct": MAVERICK_TEXT_CONFIG,
}

# The vision tower + projector of the multimodal checkpoints (Llama4ForConditionalGeneration), which training
# carries through untouched but serving and quantization load: the published vision_config (34 layers, width
# 1408, MLP 5632, patch 14, pixel-shuffle adapter to 4096) and the 4096 -> 5120 projector, counted layer by layer.
VISION_PARAMS = 0.87e9
