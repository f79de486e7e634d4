"""How the recipe wraps and shards the model: activation checkpointing per decoder layer, FSDP2 units.

One place for both the trainer (tunerecipes/sft.py) and ``finetune plan``, which applies the same functions to the
model on the meta device over a fake process group to measure what each rank will hold before any GPU is rented.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torchtune import training


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations (torchtune's wrapper)."""
    layers = list(getattr(model, "layers", []))
    training.set_activation_checkpointing(model, auto_wrap_policy={type(layer) for layer in layers})


# Modules outside the decoder layers that get FSDP units of their own (torchtune's custom_sharded_layers).
OWN_UNITS = ("tok_embeddings", "output")


def mixed_precision(compute: torch.dtype) -> MixedPrecisionPolicy:
    """fp32 master weights: FSDP gathers each unit in ``compute`` for forward and backward, and reduce-scatters the
    gradients in fp32 into fp32 shards, which the optimizer updates (a bf16 AdamW step rounds away updates under
    ~2^-8 of a weight: at lr 1e-5 most of them)."""
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def shard(model: nn.Module, *, cpu_offload: bool, reshard_after_forward: bool, mesh: DeviceMesh | None = None,
          mp_policy: MixedPrecisionPolicy | None = None, ignored: set[nn.Parameter] | None = None,
          pin_memory: bool = True) -> None:
    """FSDP2: one unit per decoder layer (its checkpoint wrapper, when present), one each for the token embeddings
    and the output projection, then the root unit with what is left (the final norm).

    Why separate embedding and output units: in the root they stay gathered from the first forward to the end of
    backward (~3.9 GiB for Llama 4's 202k x 5120 pair); as units they are gathered only while they run.

    ``ignored``: parameters FSDP leaves alone (the expert-parallel experts, tunerecipes/expert_parallel.py).
    ``pin_memory``: offloaded states in page-locked host memory (the planner's trace turns it off: fake tensors have
    no pages to lock)."""
    units = set(map(id, getattr(model, "layers", [])))
    for name in OWN_UNITS:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=True)):
            units.add(id(module))
    # torchtune's shard_model, plus the mixed-precision policy it does not take: innermost units first, the root last.
    kwargs: dict = {"reshard_after_forward": reshard_after_forward, "mesh": mesh, "ignored_params": ignored}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=pin_memory)
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for module in reversed(list(model.modules())):
        if id(module) in units:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
