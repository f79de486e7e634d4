"""The complete torchtune config of a training run: ``profiles/recipes/sft.yaml`` with the profile's ``train:``
section on top (``recipe_overrides`` last)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.plan.recipe import TEMPLATE, model_section, recipe_config
from finetune.profile import TrainConfig
from finetune.stage import PermanentError


def render_config(train: TrainConfig, max_seq_len: int, workdir: Path, model_dir: Path, pack_dir: Path,
                  estimated_save_s: float | None = None) -> dict[str, Any]:
    """The complete recipe config for this profile (plain dict, interpolations such as ${output_dir} kept): the
    config ``finetune plan`` sizes (finetune/plan/recipe.py), with this run's paths.

    ``estimated_save_s`` (the plan's checkpoint save time) decides whether a SIGTERM leaves time to save."""
    tokenizer = model_dir / "tokenizer.json"
    rendered = recipe_config(train, {
        "output_dir": str(workdir),
        "model": model_section(train, str(model_dir), max_seq_len),
        "checkpointer": {"checkpoint_dir": str(model_dir)},
        "tokenizer_file": str(tokenizer) if tokenizer.is_file() else None,
        "dataset": {"path": str(pack_dir)},
        "checkpoint": {"estimated_save_s": estimated_save_s},
    })
    missing = sorted(_missing_values(rendered))
    if missing:
        raise PermanentError(f"{TEMPLATE}: rendered config leaves {', '.join(missing)} unset (???)")
    return rendered


def _missing_values(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [m for key, value in node.items() for m in _missing_values(value, f"{path}{key}.")]
    return [path.rstrip(".")] if node == "???" else []
