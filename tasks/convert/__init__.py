"""convert: the trained checkpoint (DCP or safetensors) -> a Hugging Face checkpoint transformers and vLLM load.

Output (the stage's directory): ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` in the
profile's ``convert.dtype`` and ``convert.max_shard_size``; config, tokenizer and generation config from the base;
for LoRA runs the adapters merged into their base weights, and the adapter also in PEFT format under ``adapter/``.
A multimodal base keeps its vision tower and projector byte for byte.

Tensors stream: each shard file is written tensor by tensor straight from the checkpoint's files, unchanged bytes
by an in-kernel copy, casts a chunk at a time (see checkpoint.py); no shard is ever held in memory.
"""

from __future__ import annotations

from typing import Any

from finetune.profile import Profile
from finetune.stage import StageSpec, deferred

run = deferred("tasks.convert.to_hf")


def config(profile: Profile) -> dict[str, Any]:
    return profile.convert.model_dump(mode="json")


SPEC = StageSpec(name="convert", version="1", run=run, config=config, upstream=("download", "train"))
