"""How the recipe wraps and shards the model: activation checkpointing per decoder layer, FSDP2 units.

One place for both the trainer (tunerecipes/sft.py) and ``finetune plan``, which applies the same functions to the
model on the meta device over a fake process group to measure what each rank will hold before any GPU is rented.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torchtune import training


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations (torchtune's wrapper)."""
    layers = list(getattr(model, "layers", []))
    training.set_activation_checkpointing(model, auto_wrap_policy={type(layer) for layer in layers})


def shard(model: nn.Module, *, cpu_offload: bool, reshard_after_forward: bool, mesh: DeviceMesh | None = None) -> None:
    """FSDP2: one unit per decoder layer (its checkpoint wrapper, when present), then the root unit, which holds
    what is left: token embeddings, the final norm and the output projection."""
    units = set(map(id, getattr(model, "layers", [])))
    training.shard_model(
        model, [lambda name, module: id(module) in units],
        cpu_offload=cpu_offload, reshard_after_forward=reshard_after_forward, dp_mesh=mesh,
    )
