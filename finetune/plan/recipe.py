"""What the recipe will be asked to do for a profile: the recipe config the train stage renders and the settings
that size a run, read from that same config.

The config is ``profiles/recipes/sft.yaml``'s defaults, the profile's ``train:`` fields on top (``train_section``,
``model_section``), ``train.recipe_overrides`` last; the train stage adds its paths (tasks/train/recipe_config.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from finetune.plan.errors import PlanError
from finetune.profile import REPO_ROOT, Profile, TrainConfig, deep_merge, nested

TEMPLATE = REPO_ROOT / "profiles" / "recipes" / "sft.yaml"
# Recipe config sections whose keys are a component's keyword arguments: overrides may add new ones.
COMPONENT_SECTIONS = {"model", "checkpointer", "dataset", "optimizer", "lr_scheduler", "loss"}


def train_section(train: TrainConfig) -> dict[str, Any]:
    """The profile's ``train:`` fields under the recipe config's names (paths and the model section aside)."""
    return {
        "method": train.tuning,
        "dpo": train.dpo.model_dump(mode="json") if train.method == "dpo" else None,
        **({"collate_fn": "tunerecipes.dpo.collate_pairs"} if train.method == "dpo" else {}),
        "device": train.device,
        "dtype": train.dtype,
        "seed": train.seed,
        "epochs": train.epochs,
        "max_steps": train.max_steps,
        "batch_size": train.batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "optimizer": {"lr": train.lr, "weight_decay": train.weight_decay},
        "lr_scheduler": {"num_warmup_steps": train.warmup_steps},
        "enable_activation_checkpointing": train.activation_checkpointing,
        "compile": train.compile,
        "fsdp_cpu_offload": train.fsdp_cpu_offload,
        "expert_parallel": train.expert_parallel,
        "checkpoint": {"every_n_steps": train.checkpoint_every_steps, "async_save": train.async_checkpoint,
                       "every_n_minutes": train.checkpoint_every_minutes},
        "preemption_grace_s": train.preemption_grace_s,
        "final_format": "dcp" if train.enable_dcp else "hf",
    }


def recipe_config(train: TrainConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The recipe config for ``train``: template, train section, ``extra`` (the stage's paths and model section),
    ``train.recipe_overrides`` last. A plain dict; interpolations such as ${output_dir} are kept."""
    template = OmegaConf.to_container(OmegaConf.load(TEMPLATE), resolve=False)
    assert isinstance(template, dict)
    config = deep_merge(deep_merge(template, train_section(train)), dict(extra or {}))
    return deep_merge(config, _nested_overrides(train.recipe_overrides, template))


def _nested_overrides(overrides: Mapping[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """``{"optimizer.lr": 1e-4}`` and ``{"optimizer": {"lr": 1e-4}}`` alike; unknown keys are typos."""
    found: dict[str, Any] = {}
    for dotted, value in _flatten(overrides).items():
        parts = dotted.split(".")
        if parts[0] not in template:
            raise PlanError(f"train.recipe_overrides.{dotted}: '{parts[0]}' is not a key of {TEMPLATE.name} "
                            f"(known: {', '.join(sorted(template))})")
        if len(parts) > 1 and parts[0] not in COMPONENT_SECTIONS and isinstance(template[parts[0]], dict):
            if parts[1] not in template[parts[0]]:
                raise PlanError(f"train.recipe_overrides.{dotted}: '{parts[1]}' is not a key of '{parts[0]}' "
                                f"(known: {', '.join(sorted(template[parts[0]]))})")
        found = deep_merge(found, nested(parts, value))
    return found


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
        if train.tuning == "qlora":
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
    """Read from the config the train stage will render (recipe_config), so the plan sizes what the trainer runs."""
    train = profile.train
    config = recipe_config(train)
    checkpoint = config["checkpoint"]
    overrides = _flatten(train.recipe_overrides)
    return RecipeSettings(
        dtype=config["dtype"],
        master_dtype=config.get("master_dtype") or config["dtype"],
        batch_size=int(config["batch_size"]),
        gradient_accumulation_steps=int(config["gradient_accumulation_steps"]),
        activation_checkpointing=bool(config["enable_activation_checkpointing"]),
        cpu_offload=bool(config["fsdp_cpu_offload"]),
        reshard_after_forward=bool(config["fsdp_reshard_after_forward"]),
        optimizer=str(config["optimizer"]["_component_"]),
        async_save=bool(checkpoint["async_save"]),
        keep_last=int(checkpoint["keep_last"]),
        final_format=str(config["final_format"]),
        # What the profile's model section does not say: model_section builds the rest from the profile.
        model_overrides={key.removeprefix("model."): item for key, item in overrides.items()
                         if key.startswith("model.") and key not in ("model._component_", "model.config")},
        expert_parallel=int(config["expert_parallel"]),
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
