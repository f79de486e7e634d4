"""Training memory per GPU and per node, from the measured shards and the activation estimate.

Per GPU (rank 0, the largest shard): sharded parameters, gradients and optimizer states (on the host under FSDP
CPU offload); what FSDP gathers (the root unit stays gathered from forward to the end of backward; a layer unit and
the prefetched next one; the unit's unsharded gradients before their reduce-scatter); activations; the optimizer's
foreach temporaries; NCCL buffers and the CUDA context; allocator fragmentation on top. Loading the base weights is
its own, earlier peak: each process reads only its shard's slice of one tensor at a time from the memory-mapped
checkpoint (tunerecipes/base_weights.py), so it holds the shards loaded so far plus one slice, and host RAM holds one
slice per process (the file's pages sit in the page cache, which the kernel evicts as needed). DPO's frozen_copy
reference is a second set of the policy's parameter shards (no gradients, no optimizer states), loaded after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.plan.activations import Activations
from finetune.plan.catalog import GIB, Constants
from finetune.plan.model import MeasuredModel

# Optimizer states per trainable parameter, kept in the parameter's dtype (torch.optim's zeros_like).
OPTIMIZER_STATES = {"torch.optim.AdamW": 2, "torch.optim.Adam": 2, "torch.optim.SGD": 1}
ADAM_LIKE = 2


def optimizer_states(component: str) -> tuple[int, str]:
    """States per parameter, and a note when the optimizer is not in the table (counted as Adam-like)."""
    if component in OPTIMIZER_STATES:
        return OPTIMIZER_STATES[component], ""
    return ADAM_LIKE, f"optimizer {component} is not in the planner's table: counted with Adam's 2 states"


@dataclass(frozen=True)
class TrainingMemory:
    breakdown: dict[str, float]
    """GiB per GPU by component; their sum times (1 + fragmentation) is the peak."""
    peak_gib: float
    load_peak_gib: float
    host_gib_per_node: float
    host_breakdown: dict[str, float]
    checkpoint_bytes: int
    checkpoint_bytes_per_rank: int


def training_memory(model: MeasuredModel, activations: Activations, *, states: int, cpu_offload: bool,
                    reshard_after_forward: bool, lora: bool, async_save: bool, nproc_per_node: int,
                    on_gpu: bool, constants: Constants, compute_ratio: float = 1.0,
                    reference_copy: bool = False) -> TrainingMemory:
    params, trainable = model.local_param_bytes, model.local_trainable_bytes
    optimizer = states * trainable
    reference = params if reference_copy else 0  # sharded like the policy; its units gather between the policy's
    # parameters, gradients, optimizer states of this rank, and the frozen reference's parameters
    sharded_state = params + trainable + optimizer + reference
    units = model.units
    largest_unit = max(units, key=lambda unit: unit.full_bytes, default=None)
    if not model.sharded or largest_unit is None:
        gathered = unsharded_grads = 0
    else:
        # Resharded after forward: the root plus the unit working and the one prefetched; else every unit stays.
        held = 2 * largest_unit.full_bytes if reshard_after_forward else sum(unit.full_bytes for unit in units)
        gathered = model.root.full_bytes + held
        unsharded_grads = model.root.trainable_full_bytes + max(unit.trainable_full_bytes for unit in units)
    if compute_ratio != 1.0:
        # Mixed precision (fp32 master weights): units are gathered in the compute dtype, and each unit's
        # compute-dtype gradients are cast to fp32 for the reduce-scatter while they still exist.
        gathered = int(gathered * compute_ratio)
        unsharded_grads = int(unsharded_grads * (compute_ratio + 1))
    on_device = 0 if cpu_offload else sharded_state
    # foreach AdamW allocates one tensor per parameter for the denominator; it runs after activations are freed.
    step_temp = 0 if cpu_offload else trainable
    dequantized = model.nf4_dequantized_bytes
    working = max(gathered + unsharded_grads + activations.total + dequantized, step_temp)
    breakdown = {
        "params": 0 if cpu_offload else params,
        "reference_copy_params": 0 if cpu_offload else reference,
        "grads": 0 if cpu_offload else trainable,
        "optimizer_states": 0 if cpu_offload else optimizer,
        "gathered_units_and_prefetch": gathered,
        "unsharded_grads_before_reduce_scatter": unsharded_grads,
        "activations_kept": activations.layers_bytes,
        "activations_backward_working_set": activations.working_bytes,
        "logits_and_loss": activations.logits_bytes,
        "nf4_dequantized_weight": dequantized,
        "optimizer_step_temporaries": max(0, step_temp - (gathered + unsharded_grads + activations.total + dequantized)),
    }
    fixed = 0.0
    if on_gpu:
        fixed = constants.cuda_context_gib + (constants.nccl_buffers_gib if model.sharded else 0.0)
    allocated = (on_device + working) / GIB
    fragmentation = allocated * constants.fragmentation if on_gpu else 0.0
    breakdown_gib = {name: value / GIB for name, value in breakdown.items()}
    if on_gpu:
        breakdown_gib["cuda_context"] = constants.cuda_context_gib
        breakdown_gib["comm_buffers_nccl"] = constants.nccl_buffers_gib if model.sharded else 0.0
        breakdown_gib["allocator_fragmentation"] = fragmentation
    peak = allocated + fixed + fragmentation
    # The largest local slice sits beside the shards loaded so far while it is copied in.
    # QLoRA quantizes each base tensor on the device as it is read: torchao's to_nf4 temporaries come on top.
    load_peak = ((0 if cpu_offload else params + reference) + model.largest_local_tensor_bytes + model.nf4_quantize_bytes) / GIB \
        + fixed

    checkpoint_per_rank = (trainable if lora else params) + optimizer
    checkpoint_total = checkpoint_per_rank * model.world_size if model.sharded else checkpoint_per_rank
    host = {
        # Each process holds one local slice of one base tensor at a time (tunerecipes/base_weights.py).
        "base_weights_while_loading": nproc_per_node * model.largest_local_tensor_bytes,
        "offloaded_params_grads_optimizer": nproc_per_node * sharded_state if cpu_offload else 0,
        "optimizer_step_temporaries_offloaded": nproc_per_node * trainable if cpu_offload else 0,
        "async_checkpoint_staging": nproc_per_node * checkpoint_per_rank if async_save else 0,
    }
    process = nproc_per_node * (constants.host_process_gib if on_gpu else constants.host_process_gib_cpu) * GIB
    if not on_gpu:  # CPU runs keep the training state itself in host RAM
        host["training_state_and_activations"] = nproc_per_node * (on_device + working)
    load_phase = host["base_weights_while_loading"] + host["offloaded_params_grads_optimizer"]
    train_phase = sum(value for name, value in host.items() if name != "base_weights_while_loading")
    host_gib = {name: value / GIB for name, value in host.items()}
    host_gib["trainer_processes"] = process / GIB
    return TrainingMemory(
        breakdown=breakdown_gib, peak_gib=peak, load_peak_gib=load_peak,
        host_gib_per_node=(max(load_phase, train_phase) + process) / GIB, host_breakdown=host_gib,
        checkpoint_bytes=checkpoint_total, checkpoint_bytes_per_rank=checkpoint_per_rank,
    )
