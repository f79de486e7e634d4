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


# Modules outside the decoder layers that get FSDP units of their own (torchtune's custom_sharded_layers).
OWN_UNITS = ("tok_embeddings", "output")


def shard(model: nn.Module, *, cpu_offload: bool, reshard_after_forward: bool, mesh: DeviceMesh | None = None) -> None:
    """FSDP2: one unit per decoder layer (its checkpoint wrapper, when present), one each for the token embeddings
    and the output projection, then the root unit with what is left (the final norm).

    Why separate embedding and output units: in the root they stay gathered from the first forward to the end of
    backward (~3.9 GiB for Llama 4's 202k x 5120 pair); as units they are gathered only while they run."""
    units = set(map(id, getattr(model, "layers", [])))
    for name in OWN_UNITS:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=True)):
            units.add(id(module))
    training.shard_model(
        model, [lambda name, module: id(module) in units],
        cpu_offload=cpu_offload, reshard_after_forward=reshard_after_forward, dp_mesh=mesh,
    )
