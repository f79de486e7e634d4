"""Builders of the Llama 4 text decoder (and its LoRA variant) as torchtune TransformerDecoders.

Every builder is usable as a `_component_` in a torchtune recipe config. Hyper-parameters use the
names of HF `Llama4TextConfig` (so a YAML model section reads like config.json), e.g.

    model:
      _component_: llama4tune.lora_llama4_from_hf_config
      config: /ckpt/Llama-4-Scout-17B-16E/config.json
      lora_attn_modules: [q_proj, v_proj]
      lora_rank: 8
      lora_alpha: 16

Module/key layout (torchtune conventions): tok_embeddings, layers.N.{sa_norm, attn.{q,k,v}_proj,
attn.output_proj, mlp_norm, mlp}, norm, output. A MoE layer's mlp holds router, experts
(gate_up_proj, down_proj) and shared_expert (w1=gate, w2=down, w3=up); a dense layer's mlp is a
torchtune FeedForward (w1, w2, w3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torchtune.modules import FeedForward, RMSNorm, TiedLinear, TransformerDecoder, TransformerSelfAttentionLayer
from torchtune.modules.low_precision import FrozenNF4Linear
from torchtune.modules.peft import LoRALinear

from llama4tune.attention import Llama4Attention, Llama4QKNorm
from llama4tune.config import Llama4TextArgs, load_text_args
from llama4tune.moe import GroupedExperts, Llama4MoE, LoRAGroupedExperts, TrainableRouter
from llama4tune.nf4 import NF4GroupedExperts, NF4LoRAGroupedExperts, quantization_kwargs
from llama4tune.rope import Llama4RoPE

LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")

# HF config keys accepted by the keyword builders besides Llama4TextArgs fields (derivation inputs).
EXTRA_HF_KEYS = {"interleave_moe_layer_step", "no_rope_layer_interval", "rope_parameters", "rope_scaling", "model_type"}


@dataclasses.dataclass(frozen=True)
class LoRAOptions:
    """Where and how LoRA adapters are placed."""

    lora_attn_modules: tuple[str, ...]
    apply_lora_to_mlp: bool = False
    apply_lora_to_output: bool = False
    apply_lora_to_experts: bool = False
    train_router: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    quantize_base: bool = False
    """QLoRA: frozen base linears and routed experts in NF4 (llama4tune/nf4.py); router, norms, embeddings and
    the output layer keep the model dtype."""

    def __post_init__(self) -> None:
        unknown = set(self.lora_attn_modules) - set(LORA_ATTN_MODULES)
        if unknown:
            raise ValueError(f"lora_attn_modules: unknown {sorted(unknown)}; choose from {LORA_ATTN_MODULES}")
        if self.lora_rank <= 0:
            raise ValueError(f"lora_rank must be positive, got {self.lora_rank}")


def _linear(in_dim: int, out_dim: int, *, bias: bool, lora: LoRAOptions | None, use_lora: bool,
            quantizable: bool = True) -> nn.Module:
    nf4 = lora is not None and lora.quantize_base and quantizable
    nf4_kwargs = quantization_kwargs(in_dim * out_dim) if nf4 else {}
    if lora is not None and use_lora:
        return LoRALinear(in_dim, out_dim, rank=lora.lora_rank, alpha=lora.lora_alpha, dropout=lora.lora_dropout,
                          use_bias=bias, quantize_base=nf4, **nf4_kwargs)
    if nf4:
        return FrozenNF4Linear(in_dim, out_dim, bias=bias, **nf4_kwargs)
    return nn.Linear(in_dim, out_dim, bias=bias)


def _swiglu(dim: int, hidden: int, lora: LoRAOptions | None) -> FeedForward:
    on = lora is not None and lora.apply_lora_to_mlp
    return FeedForward(
        gate_proj=_linear(dim, hidden, bias=False, lora=lora, use_lora=on),
        down_proj=_linear(hidden, dim, bias=False, lora=lora, use_lora=on),
        up_proj=_linear(dim, hidden, bias=False, lora=lora, use_lora=on),
    )


def _attention(args: Llama4TextArgs, layer_idx: int, lora: LoRAOptions | None) -> Llama4Attention:
    d, hd, bias = args.hidden_size, args.head_dim, args.attention_bias
    targets = set(lora.lora_attn_modules) if lora is not None else set()
    rope = args.uses_rope(layer_idx)
    return Llama4Attention(
        embed_dim=d,
        num_heads=args.num_attention_heads,
        num_kv_heads=args.num_key_value_heads,
        head_dim=hd,
        q_proj=_linear(d, args.num_attention_heads * hd, bias=bias, lora=lora, use_lora="q_proj" in targets),
        k_proj=_linear(d, args.num_key_value_heads * hd, bias=bias, lora=lora, use_lora="k_proj" in targets),
        v_proj=_linear(d, args.num_key_value_heads * hd, bias=bias, lora=lora, use_lora="v_proj" in targets),
        output_proj=_linear(args.num_attention_heads * hd, d, bias=bias, lora=lora, use_lora="output_proj" in targets),
        pos_embeddings=Llama4RoPE(hd, args.rope_theta, args.rope_scaling) if rope else None,
        # HF: qk-norm only on RoPE layers, with eps = rms_norm_eps.
        qk_norm=Llama4QKNorm(args.rms_norm_eps) if rope and args.use_qk_norm else None,
        attention_chunk_size=args.chunk_size(layer_idx),
        attn_temperature_tuning=args.attn_temperature_tuning and not rope,
        floor_scale=args.floor_scale,
        attn_scale=args.attn_scale,
        attn_dropout=args.attention_dropout,
    )


def _moe(args: Llama4TextArgs, lora: LoRAOptions | None, use_grouped_mm: bool) -> Llama4MoE:
    d, e = args.hidden_size, args.num_local_experts
    router_cls = TrainableRouter if lora is not None and lora.train_router else nn.Linear
    nf4 = lora is not None and lora.quantize_base
    if lora is not None and lora.apply_lora_to_experts:
        experts: GroupedExperts = (NF4LoRAGroupedExperts if nf4 else LoRAGroupedExperts)(
            dim=d,
            hidden_dim=args.intermediate_size,
            num_experts=e,
            rank=lora.lora_rank,
            alpha=lora.lora_alpha,
            dropout=lora.lora_dropout,
            use_grouped_mm=use_grouped_mm,
        )
    else:
        experts = (NF4GroupedExperts if nf4 else GroupedExperts)(
            dim=d, hidden_dim=args.intermediate_size, num_experts=e, use_grouped_mm=use_grouped_mm)
    return Llama4MoE(
        router=router_cls(d, e, bias=False),
        experts=experts,
        shared_expert=_swiglu(d, args.intermediate_size, lora),
        top_k=args.num_experts_per_tok,
    )


def build_llama4(
    args: Llama4TextArgs,
    *,
    max_seq_len: int | None = None,
    use_grouped_mm: bool = True,
    lora: LoRAOptions | None = None,
) -> TransformerDecoder:
    """The Llama 4 text decoder for `args`, optionally with LoRA adapters."""
    d = args.hidden_size
    layers = []
    for i in range(args.num_hidden_layers):
        mlp = _moe(args, lora, use_grouped_mm) if args.is_moe_layer(i) else _swiglu(d, args.intermediate_size_mlp, lora)
        layers.append(
            TransformerSelfAttentionLayer(
                attn=_attention(args, i, lora),
                mlp=mlp,
                sa_norm=RMSNorm(d, eps=args.rms_norm_eps),
                mlp_norm=RMSNorm(d, eps=args.rms_norm_eps),
            )
        )
    tok_embeddings = nn.Embedding(args.vocab_size, d)
    if args.tie_word_embeddings:
        if lora is not None and lora.apply_lora_to_output:
            raise ValueError("apply_lora_to_output needs an untied output (tie_word_embeddings=False)")
        output: nn.Module | TiedLinear = TiedLinear(tok_embeddings)
    else:
        output = _linear(d, args.vocab_size, bias=False, lora=lora, use_lora=lora is not None and lora.apply_lora_to_output,
                         quantizable=False)
    return TransformerDecoder(
        tok_embeddings=tok_embeddings,
        layers=layers,
        max_seq_len=max_seq_len or args.max_position_embeddings,
        num_heads=args.num_attention_heads,
        head_dim=args.head_dim,
        norm=RMSNorm(d, eps=args.rms_norm_eps),
        output=output,
    )


def _args_from_kwargs(hf_text_config: Mapping[str, Any]) -> Llama4TextArgs:
    allowed = {f.name for f in dataclasses.fields(Llama4TextArgs)} | EXTRA_HF_KEYS
    unknown = set(hf_text_config) - allowed
    if unknown:
        raise TypeError(f"unknown Llama 4 config field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in hf_text_config.items()}
    return load_text_args({"model_type": "llama4_text", **cfg})


def _lora_options(
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool,
    apply_lora_to_output: bool,
    apply_lora_to_experts: bool,
    train_router: bool,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    quantize_base: bool = False,
) -> LoRAOptions:
    return LoRAOptions(
        lora_attn_modules=tuple(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        apply_lora_to_experts=apply_lora_to_experts,
        train_router=train_router,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        quantize_base=quantize_base,
    )


def llama4_decoder(*, max_seq_len: int | None = None, use_grouped_mm: bool = True, **hf_text_config: Any) -> TransformerDecoder:
    """Llama 4 decoder from HF text-config fields given as keywords (HF defaults for the rest)."""
    return build_llama4(_args_from_kwargs(hf_text_config), max_seq_len=max_seq_len, use_grouped_mm=use_grouped_mm)


def lora_llama4_decoder(
    *,
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    apply_lora_to_experts: bool = False,
    train_router: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    max_seq_len: int | None = None,
    use_grouped_mm: bool = True,
    **hf_text_config: Any,
) -> TransformerDecoder:
    """LoRA Llama 4 decoder from HF text-config fields given as keywords."""
    lora = _lora_options(
        lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, apply_lora_to_experts,
        train_router, lora_rank, lora_alpha, lora_dropout,
    )  # fmt: skip
    return build_llama4(_args_from_kwargs(hf_text_config), max_seq_len=max_seq_len, use_grouped_mm=use_grouped_mm, lora=lora)


def llama4_from_hf_config(
    config: str | Path | Mapping[str, Any], *, max_seq_len: int | None = None, use_grouped_mm: bool = True
) -> TransformerDecoder:
    """Decoder matching an HF Llama 4 config.json (path, directory or dict; text or multimodal)."""
    return build_llama4(load_text_args(config), max_seq_len=max_seq_len, use_grouped_mm=use_grouped_mm)


def lora_llama4_from_hf_config(
    config: str | Path | Mapping[str, Any],
    *,
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    apply_lora_to_experts: bool = False,
    train_router: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    quantize_base: bool = False,
    max_seq_len: int | None = None,
    use_grouped_mm: bool = True,
) -> TransformerDecoder:
    """LoRA decoder matching an HF Llama 4 config.json (``quantize_base``: QLoRA's NF4 base)."""
    lora = _lora_options(
        lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, apply_lora_to_experts,
        train_router, lora_rank, lora_alpha, lora_dropout, quantize_base,
    )  # fmt: skip
    return build_llama4(load_text_args(config), max_seq_len=max_seq_len, use_grouped_mm=use_grouped_mm, lora=lora)
