"""The complete torchtune config of a training run: ``profiles/recipes/sft.yaml`` with the profile's ``train:``
section on top (``recipe_overrides`` last)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from finetune.plan.recipe import TEMPLATE, model_section
from finetune.profile import TrainConfig, deep_merge
from finetune.stage import PermanentError

# Recipe config sections whose keys are a component's keyword arguments: overrides may add new ones.
COMPONENT_SECTIONS = {"model", "checkpointer", "dataset", "optimizer", "lr_scheduler", "loss"}


def render_config(train: TrainConfig, max_seq_len: int, workdir: Path, model_dir: Path, pack_dir: Path,
                  estimated_save_s: float | None = None) -> dict[str, Any]:
    """The complete recipe config for this profile (plain dict, interpolations such as ${output_dir} kept).

    ``estimated_save_s`` (the plan's checkpoint save time) decides whether a SIGTERM leaves time to save."""
    base = OmegaConf.to_container(OmegaConf.load(TEMPLATE), resolve=False)
    assert isinstance(base, dict)
    # The same model section `finetune plan` sizes, so the plan and the trainer cannot drift apart.
    model = model_section(train, str(model_dir), max_seq_len)
    tokenizer = model_dir / "tokenizer.json"
    rendered = deep_merge(base, {
        "output_dir": str(workdir),
        "method": train.method,
        "device": train.device,
        "dtype": train.dtype,
        "seed": train.seed,
        "model": model,
        "checkpointer": {"checkpoint_dir": str(model_dir)},
        "tokenizer_file": str(tokenizer) if tokenizer.is_file() else None,
        "dataset": {"path": str(pack_dir)},
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
                       "every_n_minutes": train.checkpoint_every_minutes, "estimated_save_s": estimated_save_s},
        "preemption_grace_s": train.preemption_grace_s,
        "final_format": "dcp" if train.enable_dcp else "hf",
    })
    rendered = deep_merge(rendered, _nested_overrides(train.recipe_overrides, base))
    missing = sorted(_missing_values(rendered))
    if missing:
        raise PermanentError(f"{TEMPLATE}: rendered config leaves {', '.join(missing)} unset (???)")
    return rendered


def _nested_overrides(overrides: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``{"optimizer.lr": 1e-4}`` and ``{"optimizer": {"lr": 1e-4}}`` alike; unknown top-level keys are typos."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        if parts[0] not in base:
            raise PermanentError(
                f"train.recipe_overrides.{dotted}: '{parts[0]}' is not a key of {TEMPLATE.name} "
                f"(known: {', '.join(sorted(base))})"
            )
        if len(parts) > 1 and parts[0] not in COMPONENT_SECTIONS and isinstance(base[parts[0]], dict):
            if parts[1] not in base[parts[0]]:
                raise PermanentError(f"train.recipe_overrides.{dotted}: '{parts[1]}' is not a key of '{parts[0]}' "
                                     f"(known: {', '.join(sorted(base[parts[0]]))})")
        patch: Any = value
        for part in reversed(parts[1:]):
            patch = {part: patch}
        nested = deep_merge(nested, {parts[0]: patch})
    return nested


def _missing_values(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [m for key, value in node.items() for m in _missing_values(value, f"{path}{key}.")]
    return [path.rstrip(".")] if node == "???" else []


