"""What the GPU check runs on: the reduced Scout-shaped model, its scaled-down CPU twin, and the run's settings.

The reduced model is Llama 4 Scout as published (``llama4tune.models.SCOUT_TEXT_CONFIG``: hidden 5120, 40 query /
8 key-value heads of 128, 16 routed experts of intermediate 8192 plus the shared expert, vocab 202048) cut to two
decoder layers, one RoPE layer with chunked local attention and one NoPE layer with global attention (HF's
``no_rope_layers`` [1, 0]). About 6.5B parameters: ~13 GB in bf16, and ~52 GB with gradients and bf16 AdamW states.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from llama4tune.models import SCOUT_TEXT_CONFIG

GPU_TYPE = "H200-141GB"
"""The `finetune plan` catalog entry the check plans for and takes the dense bf16 peak (MFU's denominator) from."""


def reduced_scout_config() -> dict[str, Any]:
    """HF llama4_text config of the reduced Scout: the published dims, two layers (RoPE/chunked, NoPE/global)."""
    return {"model_type": "llama4_text", **SCOUT_TEXT_CONFIG, "num_hidden_layers": 2, "no_rope_layers": [1, 0],
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 5}


def quick_config(vocab_size: int) -> dict[str, Any]:
    """The same architecture scaled down for CPU: every layer kind, GQA, 4 experts, a chunk shorter than the
    sequence (so chunked attention really masks); sizes divisible by the quick AWQ group of 32."""
    return {**reduced_scout_config(), "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 64,
            "intermediate_size_mlp": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "num_local_experts": 4, "attention_chunk_size": 32, "floor_scale": 16,
            "rope_scaling": {**SCOUT_TEXT_CONFIG["rope_scaling"], "original_max_position_embeddings": 32}}


@dataclass(frozen=True)
class Settings:
    """Sizes, step counts and per-step time budgets (seconds) of one run of the check."""

    seq_len: int = 8192
    batch_size: int = 1
    train_steps: int = 50
    warmup_steps: int = 5
    """Optimizer steps left out of the tokens/s median (allocator warm-up, kernel autotuning)."""
    baseline_steps: int = 12
    lora_steps: int = 4
    parity_seq_len: int = 2048
    probe_seq_len: int = 512
    calibration_samples: int = 16
    calibration_seq_len: int = 1024
    group_size: int = 128
    lr: float = 1e-5
    time_limit_s: float = 530.0
    """Whole-run limit from the first step on: the device tool stops a command at 600 s, and the wheels' install,
    Python's start, the imports, the watchdog's grace and the exit need the rest."""
    budgets: dict[str, float] = field(default_factory=lambda: {
        "base": 90, "baseline": 60, "parity": 60, "train": 180, "convert": 90, "lora": 120, "quantize": 150})


def quick_settings() -> Settings:
    """Everything scaled down so every step runs on 2 busy CPU cores in about a minute."""
    return replace(Settings(), seq_len=64, batch_size=2, train_steps=6, warmup_steps=2, baseline_steps=3,
                   lora_steps=4, parity_seq_len=64, probe_seq_len=32, calibration_samples=4,
                   calibration_seq_len=32, group_size=32, lr=1e-3, time_limit_s=300.0,
                   budgets={"base": 60, "baseline": 60, "parity": 30, "train": 90, "convert": 60, "lora": 90,
                            "quantize": 120})
