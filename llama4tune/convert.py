"""Weight conversion between HF Llama 4 checkpoints and the llama4tune (torchtune) layout.

Tensors are never changed, only renamed: HF Llama 4 already uses interleaved RoPE (no q/k
permutation) and our experts keep HF's fused layout. So conversion is bit-exact and works on one
tensor at a time; a streaming converter calls the per-key functions shard by shard:

    hf_to_tune_key(hf_key, config) -> tune_key | None
        None for tensors that are not part of the text decoder (vision tower, projector) and for
        `lm_head.weight` of a tied model (the tune model has no separate output weight then).
    tune_to_hf_key(tune_key, multimodal_prefix=False) -> hf_key
        multimodal_prefix=True writes Llama4ForConditionalGeneration names
        (`language_model.model.layers...`, `language_model.lm_head.weight`).
    tune_to_peft_key(tune_key, multimodal_prefix=False) -> PEFT adapter key
        (`base_model.model.<hf module>.lora_A.weight` / `lora_B.weight`).

`hf_to_tune(state_dict, config)` and `tune_to_hf(state_dict, config, multimodal_prefix)` apply them
to a whole dict. Key table (N = layer index):

    HF (after optional `language_model.`)                  tune
    model.embed_tokens.weight                              tok_embeddings.weight
    model.norm.weight                                      norm.scale
    lm_head.weight                                         output.weight
    model.layers.N.input_layernorm.weight                  layers.N.sa_norm.scale
    model.layers.N.post_attention_layernorm.weight         layers.N.mlp_norm.scale
    model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}    layers.N.attn.{q,k,v}_proj.{weight,bias}
    model.layers.N.self_attn.o_proj.{weight,bias}          layers.N.attn.output_proj.{weight,bias}
    model.layers.N.feed_forward.router.weight              layers.N.mlp.router.weight
    model.layers.N.feed_forward.experts.gate_up_proj       layers.N.mlp.experts.gate_up_proj   [E, D, 2I]
    model.layers.N.feed_forward.experts.down_proj          layers.N.mlp.experts.down_proj      [E, I, D]
    model.layers.N.feed_forward.shared_expert.gate_proj    layers.N.mlp.shared_expert.w1
    model.layers.N.feed_forward.shared_expert.up_proj      layers.N.mlp.shared_expert.w3
    model.layers.N.feed_forward.shared_expert.down_proj    layers.N.mlp.shared_expert.w2
    model.layers.N.feed_forward.{gate,up,down}_proj        layers.N.mlp.{w1,w3,w2}   (dense layers)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llama4tune.config import Llama4TextArgs, load_text_args

MULTIMODAL_PREFIX = "language_model."
PEFT_PREFIX = "base_model.model."

_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "output.weight",
}
# Suffix after `model.layers.N.` (HF) <-> after `layers.N.` (tune); module paths, param name appended.
_LAYER_MODULES = {
    "input_layernorm": "sa_norm",
    "post_attention_layernorm": "mlp_norm",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.output_proj",
    "feed_forward.router": "mlp.router",
    "feed_forward.experts": "mlp.experts",
    "feed_forward.shared_expert.gate_proj": "mlp.shared_expert.w1",
    "feed_forward.shared_expert.up_proj": "mlp.shared_expert.w3",
    "feed_forward.shared_expert.down_proj": "mlp.shared_expert.w2",
    "feed_forward.gate_proj": "mlp.w1",
    "feed_forward.up_proj": "mlp.w3",
    "feed_forward.down_proj": "mlp.w2",
}
_LAYER_MODULES_INV = {v: k for k, v in _LAYER_MODULES.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.([^.]+)$")
_TUNE_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.([^.]+)$")
_NORM_MODULES = {"input_layernorm", "post_attention_layernorm"}
# Non-text parts of Llama4ForConditionalGeneration checkpoints: carried, never converted.
_MULTIMODAL_ONLY = ("vision_model.", "multi_modal_projector.")

ConfigLike = str | Path | Mapping[str, Any] | Llama4TextArgs


def is_multimodal_only_key(hf_key: str) -> bool:
    """True for vision-tower / projector tensors of a multimodal checkpoint."""
    return hf_key.startswith(_MULTIMODAL_ONLY)


def hf_to_tune_key(hf_key: str, config: ConfigLike) -> str | None:
    """tune key for one HF key, or None when the tensor is not a text-decoder weight.

    Pass a `Llama4TextArgs` (load_text_args once) when converting many keys: a path is re-read per call.
    """
    args = load_text_args(config)
    if is_multimodal_only_key(hf_key):
        return None
    key = hf_key.removeprefix(MULTIMODAL_PREFIX)
    if key in _TOP_LEVEL:
        if key == "lm_head.weight" and args.tie_word_embeddings:
            return None
        return _TOP_LEVEL[key]
    match = _HF_LAYER.match(key)
    if match is None or match.group(2) not in _LAYER_MODULES:
        raise KeyError(f"unrecognised HF Llama 4 key: {hf_key!r}")
    layer, module, param = match.groups()
    if module in _NORM_MODULES and param == "weight":
        param = "scale"
    if int(layer) >= args.num_hidden_layers:
        raise KeyError(f"{hf_key!r}: layer {layer} >= num_hidden_layers ({args.num_hidden_layers})")
    return f"layers.{layer}.{_LAYER_MODULES[module]}.{param}"


def tune_to_hf_key(tune_key: str, multimodal_prefix: bool = False) -> str:
    """HF key for one tune key (base weights only; LoRA keys go through tune_to_peft_key)."""
    prefix = MULTIMODAL_PREFIX if multimodal_prefix else ""
    inverse_top = {v: k for k, v in _TOP_LEVEL.items()}
    if tune_key in inverse_top:
        return prefix + inverse_top[tune_key]
    match = _TUNE_LAYER.match(tune_key)
    if match is None or match.group(2) not in _LAYER_MODULES_INV:
        raise KeyError(f"unrecognised llama4tune key: {tune_key!r}")
    layer, module, param = match.groups()
    hf_module = _LAYER_MODULES_INV[module]
    if hf_module in _NORM_MODULES and param == "scale":
        param = "weight"
    return f"{prefix}model.layers.{layer}.{hf_module}.{param}"


def tune_to_peft_key(tune_key: str, multimodal_prefix: bool = False) -> str:
    """PEFT adapter key for a LoRALinear adapter key (`<module>.lora_a.weight` / `.lora_b.weight`)."""
    match = re.match(r"^(.+)\.lora_([ab])\.weight$", tune_key)
    if match is None:
        raise KeyError(
            f"{tune_key!r} has no PEFT equivalent (only LoRALinear adapters map to PEFT; "
            "expert LoRA and a trained router must be merged into the base weights instead)"
        )
    hf_weight = tune_to_hf_key(f"{match.group(1)}.weight", multimodal_prefix)
    return f"{PEFT_PREFIX}{hf_weight.removesuffix('.weight')}.lora_{match.group(2).upper()}.weight"


def hf_to_tune(state_dict: Mapping[str, torch.Tensor], config: ConfigLike) -> dict[str, torch.Tensor]:
    """Whole HF state dict -> tune state dict (same tensor objects; non-text keys dropped)."""
    args = load_text_args(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new = hf_to_tune_key(key, args)
        if new is not None:
            out[new] = tensor
    return out


def tune_to_hf(
    state_dict: Mapping[str, torch.Tensor], config: ConfigLike, multimodal_prefix: bool = False
) -> dict[str, torch.Tensor]:
    """Whole tune state dict -> HF state dict (same tensor objects).

    A tied model has no `output.weight`, so no `lm_head.weight` is written (as save_pretrained does).
    """
    args = load_text_args(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "output.weight" and args.tie_word_embeddings:
            continue
        out[tune_to_hf_key(key, multimodal_prefix)] = tensor
    return out
