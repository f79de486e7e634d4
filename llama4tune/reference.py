"""Random tiny Llama 4 configs and their transformers reference models, for parity checks.

Used by the parity / conversion / LoRA tests and usable from benchmarks: `random_text_config`
draws a small but complete config (GQA, chunked local + NoPE layers, MoE or interleaved MoE/dense,
temperature tuning that actually changes values at short lengths), and `hf_reference_model`
instantiates transformers' Llama4ForCausalLM for it with seeded weights.
"""

from __future__ import annotations

import random
from typing import Any, Literal

import torch

Layout = Literal["scout", "maverick"]


def random_text_config(layout: Layout, seed: int, **overrides: Any) -> dict[str, Any]:
    """A random tiny HF llama4_text config; 'scout' = MoE on every layer, 'maverick' = interleaved."""
    rng = random.Random(f"{layout}-{seed}")
    kv_heads = rng.choice([1, 2])
    heads = kv_heads * rng.choice([1, 2, 4])
    head_dim = rng.choice([8, 16])
    cfg: dict[str, Any] = {
        "model_type": "llama4_text",
        "vocab_size": rng.choice([96, 128, 160]),
        "hidden_size": rng.choice([32, 48, 64]),
        "intermediate_size": rng.choice([16, 32]),
        "intermediate_size_mlp": rng.choice([32, 64]),
        "num_hidden_layers": rng.choice([5, 6, 8]),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_local_experts": rng.choice([2, 4, 8]),
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1 if layout == "scout" else 2,
        "attention_chunk_size": rng.choice([4, 8, 16]),
        "attn_temperature_tuning": True,
        # Small floor_scale so the NoPE temperature differs from 1 within a short test sequence.
        "floor_scale": rng.choice([2, 4, 8]),
        "attn_scale": rng.choice([0.1, 0.5]),
        "use_qk_norm": layout == "scout",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "rope_parameters": (
            {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
            if layout == "scout"
            else {"rope_type": "default", "rope_theta": 500000.0}
        ),  # fmt: skip
    }
    cfg.update(overrides)
    return cfg


def hf_reference_model(text_config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """transformers Llama4ForCausalLM for `text_config`, fp32, eval mode, weights drawn with `seed`."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(seed)
    model = Llama4ForCausalLM(Llama4TextConfig(**text_config))
    with torch.no_grad():
        # HF's init leaves norms at 1 and routers small: perturb them so every path is exercised.
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith("router.weight"):
                param.normal_(std=0.5)
    return model.eval()
