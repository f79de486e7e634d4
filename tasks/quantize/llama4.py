"""What AWQ must know about Llama 4 in transformers: model classes, expert linearization, mappings, what to skip.

Routed experts. transformers keeps them fused as 3-D parameters (``experts.gate_up_proj [E, D, 2I]``,
``experts.down_proj [E, I, D]``), which are not ``nn.Linear`` and so invisible to quantization. llm-compressor's
``Llama4LinearExperts`` (llmcompressor/modeling/moe/llama4.py) unpacks them into per-expert ``gate_proj``/``up_proj``/
``down_proj`` Linears; the checkpoint is then saved per expert (``experts.<i>.gate_proj.weight_packed``), which is
the layout vLLM's Llama 4 loader maps onto its fused MoE kernels and transformers loads back through its own
``SequentialLlama4TextExperts``. llm-compressor's automatic path (``linearize_moe``) reads ``config.text_config``
and so only works for ``Llama4ForConditionalGeneration``; for the text-only ``Llama4ForCausalLM`` we hand it a
``Llama4Config`` that wraps the text config.

AWQ mappings. llm-compressor registers mappings for ``Llama4ForConditionalGeneration`` only, as unanchored regexes.
Those break on models that interleave dense and MoE layers (Maverick): ``post_attention_layernorm -> router +
gate/up`` then groups norms of several layers into one set and fails. So the mappings here are built per layer
kind, every pattern anchored to the layers it is meant for.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.jsonfile import read_json_object
from finetune.stage import PermanentError

ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
DECODER_LAYER = "Llama4TextDecoderLayer"


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    """A compressed-tensors target: a module name, a class name, or 're:<regex>' matched from the start."""
    reason: str


# Layers left unquantized whatever the profile says.
ALWAYS_IGNORE = (
    IgnoreRule(
        r"re:(.*\.)?self_attn\.[qkv]_proj$",
        "vLLM's Llama 4 loader permutes q/k rows for its rotary embedding only for tensors named '.weight' "
        "(llama4.py permute_qk_weight_for_rotary); int4 'weight_packed'/'weight_scale' would load unpermuted, and "
        "v_proj shares the fused qkv_proj, which must be all-quantized or all-not",
    ),
)
MULTIMODAL_IGNORE = (
    IgnoreRule(r"re:^vision_model\.", "vision tower: calibration is text-only, so its activations are never seen"),
    IgnoreRule(r"re:^multi_modal_projector\.", "vision projector: calibration is text-only"),
)


def profile_rules(entries: list[str]) -> list[IgnoreRule]:
    """The profile's ``quantize.ignore``. A plain name also matches as a dotted suffix: ``lm_head`` must cover
    ``language_model.lm_head`` in a multimodal checkpoint, and compressed-tensors matches plain names exactly."""
    rules: list[IgnoreRule] = []
    for entry in entries:
        reason = f"quantize.ignore entry {entry!r}"
        rules.append(IgnoreRule(entry, reason))
        if not entry.startswith("re:"):
            rules.append(IgnoreRule(rf"re:(.*\.)?{re.escape(entry)}$", reason))
    return rules


def ignore_rules(entries: list[str], multimodal: bool) -> list[IgnoreRule]:
    return [*profile_rules(entries), *ALWAYS_IGNORE, *(MULTIMODAL_IGNORE if multimodal else ())]


MULTIMODAL_TEXT_PREFIX = "language_model."


def text_only_aliases(ignore: list[str]) -> list[str]:
    """The ignore list plus each multimodal language-model name as ``Llama4ForCausalLM`` names it.

    ``AutoModelForCausalLM`` (lm-eval's hf backend) loads a multimodal checkpoint as the text-only model, renaming
    ``language_model.model.*`` to ``model.*`` for the weights but not for compressed-tensors' ignore list; an ignored
    layer would then be set up as int4 and left uninitialised. Extra names are harmless to vLLM.
    """
    aliases = [name.removeprefix(MULTIMODAL_TEXT_PREFIX) for name in ignore if name.startswith(MULTIMODAL_TEXT_PREFIX)]
    return ignore + [alias for alias in aliases if alias not in ignore]


def architecture(model_dir: Path) -> str:
    path = model_dir / "config.json"
    config = read_json_object(path, "the convert artifact is not a Hugging Face checkpoint")
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in ARCHITECTURES:
        raise PermanentError(f"{path}: field 'architectures' must be one of {list(ARCHITECTURES)}, got {archs!r}")
    if isinstance(config.get("quantization_config"), dict):
        raise PermanentError(f"{path}: has a 'quantization_config'; quantize expects a bf16/fp32 checkpoint")
    return arch


def model_class(arch: str) -> type[torch.nn.Module]:
    import transformers

    return getattr(transformers, arch)


def text_config(model: torch.nn.Module) -> Any:
    return model.config.get_text_config()


@functools.cache
def _each_token_once_experts() -> type[torch.nn.Module]:
    """llm-compressor's ``Llama4LinearExperts`` calibrating every expert on each token once, not E times.

    transformers' Llama4TextMoe hands its experts the tokens repeated once per expert (``[E * T, D]``, block j scaled
    by each token's router score for expert j: zero unless routed to j). Upstream's calibrate-all-experts mode runs
    every expert on all E blocks, so a layer costs E x the routed forward in compute and in the activations AWQ's
    hooks keep: on the maverick-shaped tiny model (128 experts, 8 x 128 tokens) 12.6 GiB of host RAM and 95 s per
    grid point where the scout-shaped one (16 experts) takes 0.7 s. With top-1 routing the blocks' sum holds each
    token once, scaled as its routed expert sees it, which is what every expert is calibrated on here; expert i's
    output rows are that result where block i is nonzero (a bias-free SwiGLU maps a zero row to zero), so the layer's
    output is unchanged."""
    from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag
    from llmcompressor.modeling.moe.llama4 import Llama4LinearExperts

    class EachTokenOnceLlama4LinearExperts(Llama4LinearExperts):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            blocks = hidden_states.view(self.num_experts, -1, self.input_size)
            routed = blocks.ne(0).any(dim=-1, keepdim=True)  # [E, T, 1]: token t went to expert e
            if not get_calibrate_all_experts_flag() or routed.sum(dim=0).max() > 1:  # top-k > 1 would mix blocks
                return super().forward(hidden_states)
            tokens = blocks.sum(dim=0)
            return torch.cat([self[index](tokens) * routed[index] for index in range(self.num_experts)], dim=0)

    return EachTokenOnceLlama4LinearExperts


def linearize_experts(model: torch.nn.Module) -> int:
    """Replace every fused ``Llama4TextExperts`` by per-expert Linears (llm-compressor's, each token calibrated once:
    _each_token_once_experts); returns how many."""
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes
    from transformers import Llama4Config
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    fused = get_non_linearized_moes(model)
    if not fused:
        return 0
    # Llama4LinearExperts.from_experts_module reads config.text_config (the multimodal config's layout).
    config = model.config if hasattr(model.config, "text_config") else Llama4Config(text_config=model.config)
    for name, experts in fused:
        if not isinstance(experts, Llama4TextExperts):
            raise PermanentError(f"{name}: {type(experts).__name__} is not transformers' Llama4TextExperts")
        model.set_submodule(name, _each_token_once_experts().from_experts_module(experts, config))
    return len(fused)


@dataclass(frozen=True)
class DecoderLayers:
    prefix: str
    """Name of the ModuleList holding the text decoder layers, e.g. 'model.layers' or 'language_model.model.layers'."""
    moe: tuple[int, ...]
    dense: tuple[int, ...]

    @property
    def all(self) -> tuple[int, ...]:
        return tuple(sorted(self.moe + self.dense))


def decoder_layers(model: torch.nn.Module) -> DecoderLayers:
    names = [name for name, module in model.named_modules() if type(module).__name__ == DECODER_LAYER]
    if not names:
        raise PermanentError(f"{type(model).__name__} has no {DECODER_LAYER} modules: not a Llama 4 text model")
    prefix = names[0].rsplit(".", 1)[0]
    moe, dense = [], []
    for name in names:
        index = int(name.rsplit(".", 1)[1])
        (moe if hasattr(model.get_submodule(name).feed_forward, "router") else dense).append(index)
    return DecoderLayers(prefix=prefix, moe=tuple(moe), dense=tuple(dense))


def awq_mappings(layers: DecoderLayers) -> list[Any]:
    """smooth layer -> balance layers, per Llama 4 decoder layer kind (see the module docstring)."""
    from llmcompressor.modifiers.transform.awq import AWQMapping

    def at(indices: tuple[int, ...], suffix: str) -> str:
        return rf"re:^{re.escape(layers.prefix)}\.({'|'.join(map(str, indices))})\.{suffix}$"

    every = layers.all
    # No input_layernorm -> q/k/v mapping: q/k/v stay unquantized (ALWAYS_IGNORE), so there is nothing to protect.
    # v_proj -> o_proj applies where the shapes allow it (llm-compressor skips it under GQA).
    mappings = [AWQMapping(at(every, r"self_attn\.v_proj"), [at(every, r"self_attn\.o_proj")])]
    if layers.moe:
        # The router reads the same normed input as the experts: it is balanced (its weight rescaled) so its
        # logits stay exact, though it is never quantized.
        mappings.append(AWQMapping(at(layers.moe, "post_attention_layernorm"), [
            at(layers.moe, r"feed_forward\.router"),
            at(layers.moe, r"feed_forward\.(experts\.\d+|shared_expert)\.gate_proj"),
            at(layers.moe, r"feed_forward\.(experts\.\d+|shared_expert)\.up_proj"),
        ]))
    if layers.dense:
        mappings.append(AWQMapping(at(layers.dense, "post_attention_layernorm"), [
            at(layers.dense, r"feed_forward\.gate_proj"), at(layers.dense, r"feed_forward\.up_proj"),
        ]))
    # Each MLP (dense, shared expert, every routed expert): up_proj's output feeds its own down_proj.
    mappings.append(AWQMapping(at(every, r"feed_forward\.((experts\.\d+|shared_expert)\.)?up_proj"),
                               [at(every, r"feed_forward\.((experts\.\d+|shared_expert)\.)?down_proj")]))
    return mappings
