"""Finding LoRA adapters in a trained checkpoint's key list, merging one module at a time, PEFT export.

Adapter layouts (llama4tune / torchtune):
- LoRALinear: ``<m>.weight`` + ``<m>.lora_a.weight`` [r, in] + ``<m>.lora_b.weight`` [out, r]
- routed experts: ``<m>.<w>_proj`` + ``<m>.lora_<w>_a`` [E, in, r] + ``<m>.lora_<w>_b`` [E, r, out]
Only the LoRALinear kind has a PEFT equivalent (llama4tune/peft.py, the one PEFT exporter).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from finetune.stage import PermanentError
from finetune.store import atomic_file
from llama4tune.peft import CONFIG_FILE, WEIGHTS_FILE, peft_adapter
from tasks.convert.sources import TensorInfo, TensorSource

_LINEAR_A = re.compile(r"^(?P<module>.+)\.lora_a\.weight$")
_EXPERT_A = re.compile(r"^(?P<module>.+)\.lora_(?P<which>gate_up|down)_a$")
_ADAPTER_PARAM = re.compile(r"(^|\.)(lora_[^.]+|magnitude)(\.weight)?$")


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: the base tensor key and its two adapter tensor keys (all trained-checkpoint keys)."""

    base: str
    a: str
    b: str
    kind: Literal["linear", "experts"]


def find_lora_modules(tensors: Mapping[str, TensorInfo], spec: LoraSpec | None) -> dict[str, LoraModule]:
    """Base key -> adapter, checking every adapter tensor is paired and its rank matches ``spec``."""
    modules: dict[str, LoraModule] = {}
    for key in tensors:
        if (m := _LINEAR_A.match(key)) is not None:
            module = LoraModule(f"{m['module']}.weight", key, f"{m['module']}.lora_b.weight", "linear")
        elif (m := _EXPERT_A.match(key)) is not None:
            module = LoraModule(f"{m['module']}.{m['which']}_proj", key, f"{m['module']}.lora_{m['which']}_b", "experts")
        else:
            continue
        missing = [k for k in (module.base, module.b) if k not in tensors]
        if missing:
            raise PermanentError(f"LoRA adapter {key!r} has no partner tensor(s) {missing} in the checkpoint")
        modules[module.base] = module
    used = {k for m in modules.values() for k in (m.a, m.b)}
    stray = sorted(k for k in tensors if _ADAPTER_PARAM.search(k) and k not in used)
    if stray:
        raise PermanentError(f"adapter tensor(s) {stray[:5]} are not LoRA pairs this converter can merge "
                             "(DoRA magnitudes and unpaired lora_* tensors are not supported)")
    if modules and spec is None:
        raise PermanentError(f"checkpoint holds LoRA adapters (e.g. {next(iter(modules.values())).a!r}) but the "
                             "training metadata gives no lora rank/alpha")
    for module in modules.values():
        rank = tensors[module.a].shape[0] if module.kind == "linear" else tensors[module.a].shape[-1]
        if spec is not None and rank != spec.rank:
            raise PermanentError(f"{module.a!r} has rank {rank} but the training metadata says lora rank {spec.rank}")
    return modules


def merge_module(source: TensorSource, module: LoraModule, spec: LoraSpec) -> torch.Tensor:
    """The merged base weight of one module, computed in fp32 from only its three tensors."""
    from llama4tune.lora import merge_expert_lora, merge_linear_lora

    loaded = source.load([module.base, module.a, module.b], torch.float32)
    merge = merge_linear_lora if module.kind == "linear" else merge_expert_lora
    return merge(loaded[module.base], loaded[module.a], loaded[module.b], spec.rank, spec.alpha)


def write_peft_adapter(
    source: TensorSource,
    modules: Mapping[str, LoraModule],
    spec: LoraSpec,
    out_dir: Path,
    *,
    peft_key: Callable[[str], str],
    dtype: torch.dtype,
) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel`` loads on the base model
    (llama4tune/peft.py builds both; adapters are small, so they are loaded whole)."""
    from safetensors.torch import save

    keys = [k for m in modules.values() for k in (m.a, m.b)]
    weights, config = peft_adapter(source.load(keys, dtype), peft_key, spec.rank, spec.alpha)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / WEIGHTS_FILE) as handle:
        handle.write(save(weights, metadata={"format": "pt"}))
    with atomic_file(out_dir / CONFIG_FILE, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return out_dir
