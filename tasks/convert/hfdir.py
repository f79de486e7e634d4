"""The non-weight side of a Hugging Face checkpoint: the config's tensor layout, and the files carried from the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from finetune.jsonfile import read_json_object
from finetune.stage import PermanentError
from finetune.store import MANIFEST, atomic_file
from tasks.convert.sources import INDEX_NAME

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def read_config(base_dir: Path) -> dict[str, Any]:
    return read_json_object(base_dir / "config.json", "the base checkpoint is not a Hugging Face model directory")


def expected_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model in ``config.json`` saves, from a weightless (meta) instance.

    Tied weights appear once, under the name that is saved (the input embedding), as ``save_pretrained`` does.
    """
    import transformers

    config_path = base_dir / "config.json"
    try:
        config = transformers.AutoConfig.from_pretrained(base_dir)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise PermanentError(f"{config_path}: transformers cannot read it: {exc}") from exc
    arch = (config.architectures or [""])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    if model_cls is None:
        raise PermanentError(f"{config_path}: 'architectures' must name a transformers model class, got {arch!r}")
    try:
        with torch.device("meta"):
            model = model_cls(config)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise PermanentError(f"{config_path}: cannot build {arch} from it: {exc}") from exc
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # drops tied duplicates
    persistent = {name for name in model.state_dict() if name not in shapes}
    shapes.update({name: tuple(b.shape) for name, b in model.named_buffers() if name in persistent})
    return shapes


def copy_model_files(base_dir: Path, out_dir: Path, dtype: torch.dtype) -> list[str]:
    """Carry config, tokenizer and generation config from the base; config.json records the new dtype."""
    config = read_config(base_dir)
    if not any((base_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise PermanentError(f"{base_dir}: no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})")
    copied = []
    for path in sorted(base_dir.iterdir()):
        name = path.name
        if (not path.is_file() or name.startswith(".") or name in (MANIFEST, INDEX_NAME, "config.json")
                or name.endswith(_WEIGHT_SUFFIXES)):
            continue
        with open(path, "rb") as src, atomic_file(out_dir / name) as dst:
            shutil.copyfileobj(src, dst)
        copied.append(name)
    _set_dtype(config, DTYPE_NAMES[dtype])
    with atomic_file(out_dir / "config.json", "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    copied.append("config.json")
    if "generation_config.json" not in copied:
        _write_generation_config(base_dir, out_dir)
        copied.append("generation_config.json")
    return sorted(copied)


def _set_dtype(config: dict[str, Any], dtype_name: str) -> None:
    # transformers 5 reads "dtype"; older configs carry "torch_dtype". Multimodal configs nest the text config.
    for section in (config, config.get("text_config")):
        if isinstance(section, dict):
            section["dtype"] = dtype_name
            if "torch_dtype" in section:
                section["torch_dtype"] = dtype_name


def _write_generation_config(base_dir: Path, out_dir: Path) -> None:
    from transformers import AutoConfig, GenerationConfig

    generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(base_dir))
    with atomic_file(out_dir / "generation_config.json", "w") as handle:
        handle.write(generation.to_json_string())
