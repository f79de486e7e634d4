"""Named Llama 4 models: Scout 17B-16E, Maverick 17B-128E (published text configs) and the embedded tiny one.

The real sizes hold ~109B / ~400B parameters: build them under `torch.device("meta")` (as
torchtune's distributed recipes do) and load weights with the checkpointer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from torchtune.modules import TransformerDecoder

from llama4tune.builders import EXTRA_HF_KEYS, llama4_decoder, lora_llama4_decoder
from llama4tune.config import Llama4TextArgs

# Text configs of meta-llama/Llama-4-Scout-17B-16E(-Instruct) and Llama-4-Maverick-17B-128E(-Instruct).
SCOUT_TEXT_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "vocab_size": 202048,
        "hidden_size": 5120,
        "intermediate_size": 8192,
        "intermediate_size_mlp": 16384,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 10485760,
        "rms_norm_eps": 1e-5,
        "num_experts_per_tok": 1,
        "num_local_experts": 16,
        "interleave_moe_layer_step": 1,
        "use_qk_norm": True,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 16.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
        },
        "attention_chunk_size": 8192,
        "attn_temperature_tuning": True,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "tie_word_embeddings": False,
    }
)

MAVERICK_TEXT_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        **SCOUT_TEXT_CONFIG,
        "max_position_embeddings": 1048576,
        "num_local_experts": 128,
        "interleave_moe_layer_step": 2,
        "use_qk_norm": False,
        "rope_scaling": None,
    }
)

# The embedded tiny model (embedded/tiny_model.py builds its weights): the one source of its numbers, in
# Llama4TextConfig field names. Sizes chosen by measurement (that module's docstring); the vocabulary and special
# token ids are the embedded tokenizer's (embedded/tokenizer.py), which building the model checks.
TINY_TEXT_CONFIG: dict[str, Any] = {  # a dict: transformers configs take no other mapping
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,  # per routed expert and the shared expert
    "intermediate_size_mlp": 256,  # dense FFN layers (none while every layer is MoE)
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "num_local_experts": 4,
    "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 1,  # every layer MoE, as in Scout
    "use_qk_norm": True,  # L2 norm on q/k of RoPE layers only
    "no_rope_layers": [1, 1, 1, 0],  # 1 = RoPE + chunked local attention, 0 = NoPE global attention
    "no_rope_layer_interval": 4,
    "attention_chunk_size": 64,  # below the packed training length so chunking is exercised
    "attn_temperature_tuning": True,  # NoPE layers scale q by 1 + attn_scale*log1p(floor((pos+1)/floor_scale))
    "floor_scale": 64,  # real models use 8192; 64 makes the scaling change within short sequences
    "attn_scale": 0.1,
    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "router_aux_loss_coef": 0.001,
    "router_jitter_noise": 0.0,
    "bos_token_id": 0,
    "eos_token_id": [1, 4],  # <|end_of_text|>, <|eot|>
    "pad_token_id": 5,
}


# What makes a model family's shape rather than its size: the fields a rehearsal's tiny model takes from the family.
FAMILY_SHAPE_FIELDS = ("num_local_experts", "interleave_moe_layer_step", "use_qk_norm")
_FAMILY_TEXT_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"scout": SCOUT_TEXT_CONFIG, "maverick": MAVERICK_TEXT_CONFIG}
)


def embedded_text_config(family: str) -> dict[str, Any]:
    """The embedded model's config in `family`'s shape: TINY_TEXT_CONFIG's dims with the family's routed-expert count,
    MoE interleave and qk-norm, so a rehearsal of a Scout/Maverick profile trains, shards and quantizes the same
    layer layout on CPU. Family 'tiny' is TINY_TEXT_CONFIG itself (a copy)."""
    if family == "tiny":
        return dict(TINY_TEXT_CONFIG)
    if family not in _FAMILY_TEXT_CONFIGS:
        raise ValueError(f"unknown model family {family!r} (known: tiny, {', '.join(_FAMILY_TEXT_CONFIGS)})")
    shape = {name: _FAMILY_TEXT_CONFIGS[family][name] for name in FAMILY_SHAPE_FIELDS}
    return {**TINY_TEXT_CONFIG, **shape}


def _tiny_config(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The embedded tiny model's architecture (TINY_TEXT_CONFIG) with HF-named overrides."""
    math_fields = {f.name for f in dataclasses.fields(Llama4TextArgs)} | EXTRA_HF_KEYS
    return {**{k: v for k, v in TINY_TEXT_CONFIG.items() if k in math_fields}, **overrides}


def llama4_scout_17b_16e(*, max_seq_len: int = 8192, use_grouped_mm: bool = True) -> TransformerDecoder:
    """Llama 4 Scout text decoder (MoE on every layer, 16 experts, qk-norm, llama3 rope scaling)."""
    return llama4_decoder(max_seq_len=max_seq_len, use_grouped_mm=use_grouped_mm, **SCOUT_TEXT_CONFIG)


def llama4_maverick_17b_128e(*, max_seq_len: int = 8192, use_grouped_mm: bool = True) -> TransformerDecoder:
    """Llama 4 Maverick text decoder (MoE every 2nd layer, 128 experts, no qk-norm)."""
    return llama4_decoder(max_seq_len=max_seq_len, use_grouped_mm=use_grouped_mm, **MAVERICK_TEXT_CONFIG)


def llama4_tiny(*, max_seq_len: int | None = None, use_grouped_mm: bool = True, **overrides: Any) -> TransformerDecoder:
    """The embedded tiny Llama 4 (TINY_TEXT_CONFIG), HF-named fields overridable."""
    return llama4_decoder(max_seq_len=max_seq_len, use_grouped_mm=use_grouped_mm, **_tiny_config(overrides))


def lora_llama4_scout_17b_16e(
    *, lora_attn_modules: Sequence[str], max_seq_len: int = 8192, use_grouped_mm: bool = True, **lora_kwargs: Any
) -> TransformerDecoder:
    """LoRA Scout; lora_kwargs: apply_lora_to_mlp/output/experts, train_router, lora_rank/alpha/dropout."""
    return lora_llama4_decoder(
        lora_attn_modules=lora_attn_modules, max_seq_len=max_seq_len, use_grouped_mm=use_grouped_mm,
        **lora_kwargs, **SCOUT_TEXT_CONFIG,
    )  # fmt: skip


def lora_llama4_maverick_17b_128e(
    *, lora_attn_modules: Sequence[str], max_seq_len: int = 8192, use_grouped_mm: bool = True, **lora_kwargs: Any
) -> TransformerDecoder:
    """LoRA Maverick; lora_kwargs as for lora_llama4_scout_17b_16e."""
    return lora_llama4_decoder(
        lora_attn_modules=lora_attn_modules, max_seq_len=max_seq_len, use_grouped_mm=use_grouped_mm,
        **lora_kwargs, **MAVERICK_TEXT_CONFIG,
    )  # fmt: skip


def lora_llama4_tiny(
    *, lora_attn_modules: Sequence[str], max_seq_len: int | None = None, use_grouped_mm: bool = True, **kwargs: Any
) -> TransformerDecoder:
    """LoRA tiny model; kwargs mix LoRA options and HF-named config overrides."""
    lora_keys = {"apply_lora_to_mlp", "apply_lora_to_output", "apply_lora_to_experts", "train_router",
                 "lora_rank", "lora_alpha", "lora_dropout"}  # fmt: skip
    lora_kwargs = {k: v for k, v in kwargs.items() if k in lora_keys}
    overrides = {k: v for k, v in kwargs.items() if k not in lora_keys}
    return lora_llama4_decoder(
        lora_attn_modules=lora_attn_modules, max_seq_len=max_seq_len, use_grouped_mm=use_grouped_mm,
        **lora_kwargs, **_tiny_config(overrides),
    )  # fmt: skip
