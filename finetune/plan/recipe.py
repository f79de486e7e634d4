"""What the recipe will be asked to do for a profile: the model section and the settings that size a run.

The values follow the rendered torchtune config: ``profiles/recipes/sft.yaml``'s defaults, the profile's ``train:``
fields on top, ``train.recipe_overrides`` last (the train stage's order).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from finetune.profile import REPO_ROOT, Profile, TrainConfig

TEMPLATE = REPO_ROOT / "profiles" / "recipes" / "sft.yaml"


def model_section(train: TrainConfig, config: Any, max_seq_len: int) -> dict[str, Any]:
    """The recipe config's ``model:`` section: the llama4tune builder and its arguments for this profile."""
    model: dict[str, Any] = {"config": config, "max_seq_len": max_seq_len}
    if train.adapters_only:
        assert train.lora is not None
        model.update(
            _component_="llama4tune.lora_llama4_from_hf_config",
            lora_attn_modules=list(train.lora.attn_modules), apply_lora_to_mlp=train.lora.apply_to_mlp,
            apply_lora_to_experts=train.lora.apply_to_experts, apply_lora_to_output=train.lora.apply_to_output,
            lora_rank=train.lora.rank,
            lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout,
        )
        if train.method == "qlora":
            model["quantize_base"] = True  # NF4 base (llama4tune/nf4.py)
    else:
        model["_component_"] = "llama4tune.llama4_from_hf_config"
    return model


@dataclass(frozen=True)
class RecipeSettings:
    """The rendered recipe config's values that decide memory and time."""

    dtype: str
    """Compute dtype."""
    master_dtype: str
    """Parameters, gradients and optimizer states: fp32 master weights, or the compute dtype."""
    batch_size: int
    gradient_accumulation_steps: int
    activation_checkpointing: bool
    cpu_offload: bool
    reshard_after_forward: bool
    optimizer: str
    async_save: bool
    keep_last: int
    final_format: str
    model_overrides: Mapping[str, Any]
    expert_parallel: int = 1
    """Routed experts whole on groups of this many processes (tunerecipes/expert_parallel.py); 1: FSDP-sharded."""


def recipe_settings(profile: Profile) -> RecipeSettings:
    train = profile.train
    template = OmegaConf.to_container(OmegaConf.load(TEMPLATE), resolve=False)
    assert isinstance(template, dict)
    overrides = _flatten(train.recipe_overrides)

    def value(key: str, profile_value: Any = None) -> Any:
        if key in overrides:
            return overrides[key]
        if profile_value is not None:
            return profile_value
        node: Any = template
        for part in key.split("."):
            node = node[part]
        return node

    return RecipeSettings(
        dtype=value("dtype", train.dtype),
        master_dtype=value("master_dtype") or value("dtype", train.dtype),
        batch_size=int(value("batch_size", train.batch_size)),
        gradient_accumulation_steps=int(value("gradient_accumulation_steps", train.gradient_accumulation_steps)),
        activation_checkpointing=bool(value("enable_activation_checkpointing", train.activation_checkpointing)),
        cpu_offload=bool(value("fsdp_cpu_offload", train.fsdp_cpu_offload)),
        reshard_after_forward=bool(value("fsdp_reshard_after_forward")),
        optimizer=str(value("optimizer._component_")),
        async_save=bool(value("checkpoint.async_save", train.async_checkpoint)),
        keep_last=int(value("checkpoint.keep_last")),
        final_format=str(value("final_format", "dcp" if train.enable_dcp else "hf")),
        model_overrides={key.removeprefix("model."): item for key, item in overrides.items()
                         if key.startswith("model.") and key not in ("model._component_", "model.config")},
        expert_parallel=int(value("expert_parallel", train.expert_parallel)),
    )


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 1}}`` and ``{"optimizer.lr": 1}`` alike -> ``{"optimizer.lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, item in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(item, Mapping):
            flat.update(_flatten(item, dotted + "."))
        else:
            flat[dotted] = item
    return flat
