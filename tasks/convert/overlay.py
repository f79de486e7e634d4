"""A QLoRA run's trained checkpoint as convert reads it: the adapters from the trainer's final DCP checkpoint and
every base weight from the download stage's original safetensors, under the trained checkpoint's key names.

Why: QLoRA trains on an NF4 copy of the base, which the trainer never saves; merging into that 4-bit approximation
would bake its quantization error into the tuned model. The merge uses the bf16 weights the NF4 copy came from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from finetune.stage import PermanentError
from tasks.convert.sources import ByteRange, SafetensorsSource, TensorInfo, TensorSource


class AdaptersOnBase:
    """``adapters`` (a trained checkpoint holding only adapter tensors) plus ``base``'s weights, renamed by
    ``trained_key`` (base key -> trained-checkpoint key, None for tensors that are not trained weights)."""

    def __init__(self, adapters: TensorSource, base: SafetensorsSource,
                 trained_key: Callable[[str], str | None]) -> None:
        self.location: Path = adapters.location
        self._adapters, self._base = adapters, base
        self._base_key = {key: base_key for base_key in base.tensors()
                          if (key := trained_key(base_key)) is not None}
        both = sorted(set(self._base_key) & set(adapters.tensors()))
        if both:
            raise PermanentError(f"{adapters.location}: holds base weights {both[:3]} although a QLoRA checkpoint "
                                 f"keeps only adapters (the base comes from {base.location})")

    def tensors(self) -> dict[str, TensorInfo]:
        base = self._base.tensors()
        return {**{key: base[base_key] for key, base_key in self._base_key.items()}, **self._adapters.tensors()}

    def byte_ranges(self, key: str) -> list[ByteRange] | None:
        if key in self._base_key:
            return self._base.byte_ranges(self._base_key[key])
        return self._adapters.byte_ranges(key)

    def load(self, keys: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from_base = [key for key in keys if key in self._base_key]
        loaded = self._base.load([self._base_key[key] for key in from_base], dtype)
        out = {key: loaded[self._base_key[key]] for key in from_base}
        out.update(self._adapters.load([key for key in keys if key not in self._base_key], dtype))
        return {key: out[key] for key in keys}
