"""What the 4-bit checkpoint holds: sizes, which weights are int4 and which stayed unquantized, and why.

Read back from the written safetensors headers (plus the tiny ``weight_shape`` tensors), so the report describes
the files vLLM and transformers will load, not the in-memory model.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUANT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
NOT_LINEAR = "not an nn.Linear (embedding, norm, ...): AWQ W4A16 quantizes Linear layers only"
BIAS = "bias of an int4 layer: W4A16 quantizes weights only"

# First match wins: module name (without the parameter suffix) -> kind of weight.
_KINDS = (
    ("vision", re.compile(r"^(vision_model|multi_modal_projector)\.")),
    ("routed_expert", re.compile(r"\.experts\.\d+\.(gate|up|down)_proj$|\.experts$")),
    ("shared_expert", re.compile(r"\.shared_expert\.")),
    ("router", re.compile(r"\.router$")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("dense_mlp", re.compile(r"\.feed_forward\.(gate|up|down)_proj$")),
    ("lm_head", re.compile(r"(^|\.)lm_head$")),
    ("embedding", re.compile(r"embed_tokens$")),
    ("norm", re.compile(r"norm$")),
)


def kind_of(module: str) -> str:
    return next((kind for kind, pattern in _KINDS if pattern.search(module)), "other")


def weights_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))


def dir_bytes(model_dir: Path) -> int:
    return sum(path.stat().st_size for path in model_dir.rglob("*") if path.is_file())


@dataclass
class Inventory:
    quantized: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: {"modules": 0, "params": 0}))
    kept: dict[tuple[str, str], dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0}))

    @property
    def quantized_params(self) -> int:
        return sum(entry["params"] for entry in self.quantized.values())

    @property
    def kept_params(self) -> int:
        return sum(entry["params"] for entry in self.kept.values())

    def metrics(self) -> dict[str, Any]:
        return {
            "quantized_modules": {kind: dict(entry) for kind, entry in sorted(self.quantized.items())},
            "quantized_params": self.quantized_params,
            "unquantized": [{"kind": kind, "reason": reason, **entry}
                            for (kind, reason), entry in sorted(self.kept.items())],
            "unquantized_params": self.kept_params,
            "quantized_param_fraction": round(
                self.quantized_params / max(1, self.quantized_params + self.kept_params), 6),
        }

    def table(self) -> list[dict[str, Any]]:
        rows = [{"weights": kind, "stored": "int4 (W4A16)", "count": entry["modules"], "params": entry["params"],
                 "why": ""} for kind, entry in sorted(self.quantized.items())]
        rows += [{"weights": kind, "stored": "as in the source", "count": entry["tensors"], "params": entry["params"],
                  "why": reason} for (kind, reason), entry in sorted(self.kept.items())]
        return rows


def inventory(model_dir: Path, linear_reasons: dict[str, str]) -> Inventory:
    """Sort every tensor of the checkpoint into int4 modules and unquantized tensors.

    ``linear_reasons`` maps each Linear module left unquantized to why (an ignore rule); any other unquantized
    tensor belongs to a module that is not a Linear.
    """
    from safetensors import safe_open

    result = Inventory()
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            keys = list(handle.keys())
            packed = {key.removesuffix(".weight_packed") for key in keys if key.endswith(".weight_packed")}
            for module in packed:
                shape = handle.get_tensor(f"{module}.weight_shape").tolist()
                entry = result.quantized[kind_of(module)]
                entry["modules"] += 1
                entry["params"] += math.prod(int(dim) for dim in shape)
            for key in keys:
                module, _, suffix = key.rpartition(".")
                if module in packed and suffix in QUANT_SUFFIXES:
                    continue
                tensor = handle.get_slice(key)
                numel = math.prod(tensor.get_shape())
                reason = BIAS if module in packed else linear_reasons.get(module, NOT_LINEAR)
                entry = result.kept[(kind_of(module), reason)]
                entry["tensors"] += 1
                entry["params"] += numel
                entry["bytes"] += numel * _DTYPE_BYTES.get(tensor.get_dtype(), 4)
    return result


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
