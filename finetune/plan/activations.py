"""Activation memory of one micro-batch: what autograd keeps for backward, per token, from the layer's shapes.

An estimate, not a measurement (a MoE layer's routing cannot run on the meta device). Each term names the tensor
autograd saves; ``FORMULA`` is printed with every plan.
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4
FORMULA = (
    "per token and layer (b = dtype bytes, f = 4): RMSNorm f*d + b*d; attention b*d (projection input) "
    "+ rope/qk-norm fp32 copies f*(q+kv) + sdpa q, k and v repeated to all heads, output: 4*b*q, + output_proj input "
    "b*q; MoE top_k*(2d + 4I)*b routed + 4*I*b shared expert (dense: 4*I_mlp*b); each LoRA linear b*in (+ in for its "
    "dropout mask) + b*r. With activation checkpointing: b*d per layer kept, plus one layer recomputed and its "
    "gradients (2x the largest layer) in backward; without: every layer plus one layer of gradients. Logits: "
    "tokens*V*(b+4) (bf16 chunks and their fp32 log-softmax, CEWithChunkedOutputLoss) + one fp32 chunk gradient. "
    "CPU attention (dense mask, math kernel) adds the attention weights 2*H*s*b per token."
)


@dataclass(frozen=True)
class Shapes:
    """What the estimate reads from the model and the run."""

    hidden: int
    q_dim: int
    kv_dim: int
    heads: int
    layers: int
    moe_layers: int
    rope_layers: int
    qk_norm: bool
    top_k: int
    expert_hidden: int
    dense_hidden: int
    vocab: int
    lora_rank: int
    lora_attn: tuple[str, ...]
    lora_mlp: bool
    lora_experts: bool
    lora_dropout: bool


def _lora(in_dim: int, shapes: Shapes, b: int) -> int:
    return b * in_dim + (in_dim if shapes.lora_dropout else 0) + b * shapes.lora_rank


def layer_bytes_per_token(shapes: Shapes, b: int, *, moe: bool, rope: bool, cpu_seq_len: int = 0) -> int:
    """Bytes autograd keeps for one token of one decoder layer (no checkpointing)."""
    d, q, kv = shapes.hidden, shapes.q_dim, shapes.kv_dim
    norm = FP32 * d + b * d
    attention = norm + b * d + 4 * b * q + b * q
    if rope:
        attention += FP32 * (q + kv) * (2 if shapes.qk_norm else 1)
    else:
        attention += b * q  # NoPE temperature scaling keeps q
    attention += sum(_lora(q if name == "output_proj" else d, shapes, b) for name in shapes.lora_attn)
    if cpu_seq_len:
        attention += 2 * shapes.heads * cpu_seq_len * b
    mlp = norm + b * d
    if moe:
        mlp += shapes.top_k * (2 * d + 4 * shapes.expert_hidden) * b + 4 * shapes.expert_hidden * b
        if shapes.lora_experts:
            mlp += shapes.top_k * (_lora(d, shapes, b) + _lora(shapes.expert_hidden, shapes, b))
        hidden = shapes.expert_hidden
    else:
        mlp += 4 * shapes.dense_hidden * b
        hidden = shapes.dense_hidden
    if shapes.lora_mlp:
        mlp += 2 * _lora(d, shapes, b) + _lora(hidden, shapes, b)
    return attention + mlp


@dataclass(frozen=True)
class Activations:
    layers_bytes: int
    working_bytes: int
    logits_bytes: int

    @property
    def total(self) -> int:
        return self.layers_bytes + self.working_bytes + self.logits_bytes


def activation_bytes(shapes: Shapes, b: int, tokens: int, *, checkpointing: bool, chunks: int,
                     cpu_seq_len: int = 0) -> Activations:
    """Activations of a micro-batch of ``tokens`` tokens at the peak of backward."""
    per_layer = []
    for index in range(shapes.layers):
        per_layer.append(layer_bytes_per_token(shapes, b, moe=index < shapes.moe_layers,
                                               rope=index < shapes.rope_layers, cpu_seq_len=cpu_seq_len))
    largest = max(per_layer)
    if checkpointing:
        kept, working = shapes.layers * b * shapes.hidden, 2 * largest
    else:
        kept, working = sum(per_layer), largest
    logits = shapes.vocab * (b + (FP32 if b != FP32 else 0))
    return Activations(layers_bytes=kept * tokens, working_bytes=working * tokens,
                       logits_bytes=logits * tokens + FP32 * shapes.vocab * tokens // chunks)
