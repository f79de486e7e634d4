"""Base weights read straight into each process's shards, tensor by tensor, from the memory-mapped safetensors files.

Why: loading the whole base checkpoint into every process's RAM first (torchtune's full state dict, then
``set_model_state_dict``) costs a node N copies of the model (~6 TiB for Maverick on 8 GPUs). Here every process
asks safetensors for the rows (any slice, for any placement) its shard holds of one tensor at a time: the file is
mmapped, so the bytes come through the page cache (evictable, shared by the node's processes, each byte read by
one of them), and a process holds at most one tensor's local slice of its own outside the model.

``finetune plan`` models exactly this: host RAM per process while loading is its largest local slice, GPU memory
the shards loaded so far plus that slice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def local_slices(param: torch.Tensor) -> tuple[slice, ...]:
    """The index of the whole tensor this process's part of ``param`` holds (all of it when not a DTensor)."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    else:
        shape, offset = tuple(param.shape), (0,) * param.dim()
    return tuple(slice(start, start + size) for start, size in zip(offset, shape))


def load(model: nn.Module, index: Mapping[str, tuple[Path, str]], *, skip: Collection[str] = ()) -> int:
    """Copy each of ``model``'s state-dict tensors (but ``skip``) from ``index`` (tune key -> (file, key), see
    Llama4HFCheckpointer.tensor_index) into the materialised parameters, reading only the local slice.

    Returns the largest slice read, in bytes. Raises KeyError / ValueError naming the key on a missing tensor or a
    shape that does not match the model."""
    largest = 0
    with contextlib.ExitStack() as stack, torch.no_grad():
        files: dict[Path, object] = {}
        for name, param in model.state_dict(keep_vars=True).items():
            if name in skip:
                continue
            if name not in index:
                raise KeyError(f"base checkpoint has no tensor for {name}")
            path, key = index[name]
            if path not in files:
                files[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            stored = files[path].get_slice(key)  # type: ignore[attr-defined]
            if tuple(stored.get_shape()) != tuple(param.shape):
                raise ValueError(f"base tensor {key} in {path.name} has shape {tuple(stored.get_shape())}, the model's "
                                 f"{name} {tuple(param.shape)}: the checkpoint and the model config differ")
            local = param.to_local() if isinstance(param, DTensor) else param
            if local.numel() == 0:  # this rank's shard of a short dimension is empty
                continue
            part = stored[local_slices(param)]
            largest = max(largest, part.numel() * part.element_size())
            local.copy_(part)  # casts to the model's dtype and moves to the parameter's device
    return largest
