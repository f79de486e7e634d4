"""Expert parallelism (EP): routed experts placed whole on the ranks of an EP group instead of FSDP-sharded.

Why: FSDP all-gathers each whole MoE layer (all E experts, ~30 GiB for Maverick) per micro-batch forward and
backward. With EP degree N the world is a 2-D mesh (replica x ep, ep innermost, so an EP group stays within a node
when N <= processes per node); rank (r, i) holds experts [i*E/N, (i+1)*E/N) whole, as a DTensor
[Replicate(), Shard(0)] whose global shape stays [E, ...] (DCP and convert see HF's fused layout), and the tokens
travel to the experts (llama4tune/moe.py: run_on_owners) instead of the weights to the tokens.

Everything else (attention, shared expert, router, dense layers, embeddings, output) stays FSDP-sharded over the
whole world; FSDP ignores the expert parameters (``ignored_params``) rather than sharding them again over the
replica dimension: an expert's gradient then needs one all-reduce over its replicas per optimizer step (not one
reduce-scatter per micro-batch) and its weights are never gathered, at the price of E/N experts' bytes unsharded
per rank (the plan counts them).

Gradient scale: FSDP averages every other gradient over the world (sum over ranks / W), and the recipe then
multiplies by W / supervised tokens. An expert's local gradient already sums every token of its EP group that was
routed to it (the backward all_to_all brings those tokens' gradients home), so summing over the W/N replicas gives
the sum over all W ranks' tokens, and dividing by W makes it exactly what FSDP would hold.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from llama4tune.moe import GroupedExperts

MESH_DIMS = ("replica", "ep")


def expert_count(model: nn.Module) -> int:
    """Routed experts per MoE layer (0 without MoE layers)."""
    return max((m.num_experts for m in model.modules() if isinstance(m, GroupedExperts)), default=0)


def mesh(device_type: str, world_size: int, degree: int) -> DeviceMesh:
    """The (replica, ep) mesh: consecutive ranks form an EP group, i.e. one node's GPUs when degree <= per node."""
    return init_device_mesh(device_type, (world_size // degree, degree), mesh_dim_names=MESH_DIMS)


def place_experts(model: nn.Module, ep_mesh: DeviceMesh) -> set[nn.Parameter]:
    """Replace every routed-expert parameter (base and LoRA) of ``model`` (on the meta device, before FSDP) by this
    rank's E/N experts as a DTensor [Replicate(), Shard(0)] over ``ep_mesh``; returns them for FSDP to ignore."""
    ep = ep_mesh["ep"]
    degree, index = ep.size(), ep.get_local_rank()
    placed: set[nn.Parameter] = set()
    for module in model.modules():
        if not isinstance(module, GroupedExperts):
            continue
        if module.num_experts % degree:
            raise ValueError(f"expert_parallel {degree} does not divide the model's routed-expert count "
                             f"{module.num_experts}")
        module.ep_group = ep.get_group()
        rows = module.num_experts // degree
        for name, param in list(module.named_parameters(recurse=False)):
            local = param.detach()[index * rows:(index + 1) * rows].clone()
            shard = DTensor.from_local(local, ep_mesh, [Replicate(), Shard(0)], run_check=False,
                                       shape=param.shape, stride=param.stride())
            placed_param = nn.Parameter(shard, requires_grad=param.requires_grad)
            setattr(module, name, placed_param)
            placed.add(placed_param)
    return placed


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    """The expert-parallel parameters of ``model`` (DTensors on a (replica, ep) mesh), in model order."""
    return [p for m in model.modules() if isinstance(m, GroupedExperts) and m.ep_group is not None
            for p in m.parameters(recurse=False)]


def reduce_grads(params: list[nn.Parameter], world_size: int) -> None:
    """Each expert gradient summed over the ranks holding the same experts, divided by the world size: what FSDP's
    average over all ranks gives every other gradient (module docstring). Collective over every rank."""
    grads = []
    for param in params:
        if not param.requires_grad:
            continue
        if param.grad is None:  # every rank must join each all-reduce, whatever its tokens touched
            param.grad = torch.zeros_like(param)
        grads.append(param.grad._local_tensor)
    if not grads:
        return
    replica = params[0].device_mesh["replica"]
    if replica.size() > 1:  # in place, all in flight at once (no flat copy: full SFT's expert grads are GiBs)
        works = [dist.all_reduce(grad, group=replica.get_group(), async_op=True) for grad in grads]
        for work in works:
            work.wait()
    torch._foreach_div_(grads, float(world_size))


def _by_mesh(params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    # torch's foreach kernels (AdamW, gradient clipping) refuse DTensors of different meshes in one list.
    groups: dict[object, list[nn.Parameter]] = {}
    for param in params:
        groups.setdefault(getattr(param, "device_mesh", None), []).append(param)
    return list(groups.values())


def param_groups(params: list[nn.Parameter]) -> list[dict[str, list[nn.Parameter]]]:
    """Optimizer parameter groups, one per mesh: the optimizer's foreach step runs per group (one group without
    expert parallelism, as before)."""
    return [{"params": group} for group in _by_mesh(params)]


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ for parameters on several meshes (FSDP's and the experts'): each mesh's norm is made
    whole, the total taken over them, each mesh's gradients scaled on their own. Returns the total norm."""
    groups = _by_mesh([p for p in params if p.grad is not None])
    norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in groups]
    total = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
    for group in groups:  # takes the parameters, whose .grad it scales
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
