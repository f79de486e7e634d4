"""Step time, hours and cost: compute from the FLOPs of the active parameters and attention at an assumed MFU,
communication from the bytes FSDP moves per step at the pool's bandwidth; the step takes the longer of the two
(FSDP overlaps them) plus what cannot overlap: the CPU optimizer step under offload, and under expert parallelism
the token exchanges (each MoE layer waits for its tokens) and the once-per-step all-reduce of the experts' gradients
over their replicas; under QLoRA the NF4 dequantizations, bound by HBM bandwidth."""

from __future__ import annotations

import math
from typing import Any

from finetune.plan.catalog import GB, GIB, Accelerator, Constants
from finetune.plan.model import MeasuredModel
from finetune.profile import Profile


def flops_per_token(args: Any, seq_len: int, *, lora: bool, checkpointing: bool) -> dict[str, float]:
    """Forward FLOPs per token of the active weights (2 per multiply-add) and of attention, and the training total:
    backward costs 2x forward for full SFT, 1x for LoRA (frozen weights need input gradients only), attention 2x
    either way; activation checkpointing adds a forward."""
    d, q, kv = args.hidden_size, args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    linear = 0.0
    attention = 0.0
    for layer in range(args.num_hidden_layers):
        linear += d * (q + 2 * kv) + q * d
        if args.is_moe_layer(layer):
            linear += (args.num_experts_per_tok + 1) * 3 * d * args.intermediate_size + d * args.num_local_experts
        else:
            linear += 3 * d * args.intermediate_size_mlp
        chunk = args.chunk_size(layer)
        keys = min(seq_len, chunk) / 2 if chunk else seq_len / 2  # causal: a token sees half the window on average
        attention += 2 * 2 * q * keys
    linear += d * args.vocab_size
    forward = 2 * linear + attention
    backward = (2 if lora else 4) * linear + 2 * attention
    total = forward + backward + (forward if checkpointing else 0)
    return {"active_params": linear, "forward": forward, "train": total}


def estimate(profile: Profile, args: Any, model: MeasuredModel, gpu: Accelerator, constants: Constants, *,
             seq_len: int, batch_size: int, accum: int, cpu_offload: bool, reshard_after_forward: bool,
             checkpointing: bool, async_save: bool, states: int, checkpoint_bytes: int,
             compute_ratio: float = 1.0) -> dict[str, Any]:
    """``seq_len`` .. ``async_save``: the rendered recipe's values (recipe_settings), not the profile's fields, so
    a train.recipe_overrides of them is what the estimate sees."""
    train = profile.train
    flops = flops_per_token(args, seq_len, lora=train.adapters_only, checkpointing=checkpointing)
    if train.method == "dpo":  # the reference's forward pass (no backward) on every pair before the policy's
        flops["train"] += flops["forward"]
    tokens_per_gpu = batch_size * seq_len * accum
    tokens_per_step = tokens_per_gpu * train.world_size
    compute_s = tokens_per_gpu * flops["train"] / (gpu.bf16_dense_tflops * 1e12 * constants.mfu)

    ws = model.world_size
    share = (ws - 1) / ws if model.sharded else 0.0
    # The output projection's unit runs once per logits chunk: FSDP gathers it, and reduce-scatters its gradient,
    # per call.
    calls = {"output": constants.logits_chunks}
    layers = sum(unit.full_bytes * calls.get(unit.name, 1) for unit in model.units)
    # Units are gathered in the compute dtype (half the fp32 master bytes under mixed precision).
    gather = (model.root.full_bytes + layers * (2 if reshard_after_forward else 1)) * share * compute_ratio
    reduce_scatter = (model.root.trainable_full_bytes
                      + sum(unit.trainable_full_bytes * calls.get(unit.name, 1) for unit in model.units)) * share
    link = gpu.inter_node_gbps if train.nnodes > 1 else gpu.intra_node_gbps
    comm_bytes = accum * (gather + reduce_scatter)
    comm_s = comm_bytes / (link * GB * constants.collective_efficiency) if comm_bytes else 0.0
    offload_s = 0.0
    if cpu_offload:
        # Shards go up for forward and backward and gradients come down every micro-batch; AdamW then reads and
        # writes parameter, gradient and states on one CPU core.
        pcie = accum * (2 * model.local_param_bytes + model.local_trainable_bytes)
        comm_s += pcie / (gpu.host_to_device_gbps * GB)
        offload_s = 2 * (2 + states) * model.local_trainable_bytes / (constants.host_optimizer_gbps * GB)
    experts = _expert_parallel_comm(args, model, train, gpu, constants, tokens_per_gpu=tokens_per_gpu,
                                    checkpointing=checkpointing, token_bytes=model.dtype_bytes * compute_ratio)
    dequantize = _dequantize(model, gpu, constants, accum=accum, checkpointing=checkpointing)
    step_s = (max(compute_s, comm_s) + offload_s + experts["all_to_all_s_per_step"]
              + experts["expert_grad_all_reduce_s"] + dequantize["nf4_dequantize_s_per_step"])
    gpu_hours_per_mtok = step_s / tokens_per_step * 1e6 / 3600 * train.world_size
    price = profile.plan.price_per_gpu_hour
    save_s = checkpoint_bytes / train.nnodes / (constants.checkpoint_write_gbps_per_node * GB)
    stall_s = (model.local_trainable_bytes if train.adapters_only else model.local_param_bytes)
    stall_s = (stall_s + states * model.local_trainable_bytes) / (gpu.host_to_device_gbps * GB) \
        if async_save else save_s
    out: dict[str, Any] = {
        "flops_per_token": {name: round(value) for name, value in flops.items()},
        "tokens_per_step": tokens_per_step,
        "compute_s_per_step": round(compute_s, 2),
        "comm_gib_per_step_per_gpu": round(comm_bytes / GIB, 1),
        "interconnect": f"{'inter' if train.nnodes > 1 else 'intra'}-node {link:g} GB/s per GPU",
        "comm_s_per_step": round(comm_s, 2),
        "cpu_optimizer_s_per_step": round(offload_s, 2),
        **experts,
        **dequantize,
        "step_s": round(step_s, 2),
        "bound": "communication" if comm_s > compute_s else "compute",
        "hours_per_million_tokens": round(step_s / tokens_per_step * 1e6 / 3600, 3),
        "gpu_hours_per_million_tokens": round(gpu_hours_per_mtok, 2),
        "cost_per_million_tokens": round(gpu_hours_per_mtok * price, 2) if price else None,
        "checkpoint_save_s": round(save_s, 1),
        "checkpoint_training_stall_s": round(stall_s, 1),
        # The trainer's interval: the step trigger or the time trigger, whichever fires first.
        "checkpoint_interval_min": round(
            checkpoint_interval_s(train.checkpoint_every_steps, train.checkpoint_every_minutes, step_s) / 60, 1),
    }
    if profile.plan.dataset_tokens:
        epoch_h = profile.plan.dataset_tokens / tokens_per_step * step_s / 3600
        out["hours_per_epoch"] = round(epoch_h, 2)
        out["hours_total"] = round(epoch_h * train.epochs, 2)
        out["gpu_hours_total"] = round(epoch_h * train.epochs * train.world_size, 1)
        out["cost_total"] = round(epoch_h * train.epochs * train.world_size * price, 2) if price else None
    return out


def _dequantize(model: MeasuredModel, gpu: Accelerator, constants: Constants, *, accum: int,
                checkpointing: bool) -> dict[str, float]:
    """QLoRA: every NF4 weight is dequantized in forward, again in backward (and in the recomputed forward with
    activation checkpointing), per micro-batch, streaming llama4tune/nf4.py's bytes per weight through HBM; the
    step waits for it (same stream as the matmuls)."""
    from llama4tune import nf4

    per_pass = (model.nf4_expert_weights * nf4.EXPERT_DEQUANTIZE_TRAFFIC_BYTES_PER_WEIGHT
                + model.nf4_linear_weights * nf4.TORCHAO_DEQUANTIZE_TRAFFIC_BYTES_PER_WEIGHT)
    traffic = per_pass * (3 if checkpointing else 2) * accum
    seconds = traffic / (gpu.hbm_gbps * GB * constants.hbm_efficiency) if traffic else 0.0
    return {"nf4_dequantize_gib_per_step": round(traffic / GIB, 1), "nf4_dequantize_s_per_step": round(seconds, 2)}


def _expert_parallel_comm(args: Any, model: MeasuredModel, train: Any, gpu: Accelerator, constants: Constants, *,
                          tokens_per_gpu: int, checkpointing: bool, token_bytes: float) -> dict[str, Any]:
    """Expert parallelism's traffic per GPU and step (none at degree 1): every MoE layer sends each token's top_k
    rows of ``hidden`` values to their experts and gets them back (dispatch + combine), in forward and again for
    the gradients in backward (a third time when activation checkpointing recomputes the forward); (N-1)/N of the
    rows leave the GPU, over NVLink when an EP group fits in a node. Then the experts' gradients are all-reduced
    over the world/N replicas once per step (a ring: 2 (R-1)/R of the bytes)."""
    degree = model.expert_parallel
    if degree == 1:
        return {"all_to_all_gib_per_step_per_gpu": 0.0, "all_to_all_s_per_step": 0.0, "expert_grad_all_reduce_s": 0.0}
    moe_layers = sum(1 for layer in range(args.num_hidden_layers) if args.is_moe_layer(layer))
    passes = 2 * (3 if checkpointing else 2)  # (dispatch + combine) x (forward, backward[, recompute])
    a2a = tokens_per_gpu * args.hidden_size * token_bytes * args.num_experts_per_tok * passes * moe_layers
    a2a *= (degree - 1) / degree
    a2a_link = gpu.intra_node_gbps if degree <= train.nproc_per_node else gpu.inter_node_gbps
    replicas = train.world_size // degree
    reduce_bytes = 2 * (replicas - 1) / replicas * model.expert_trainable_local_bytes
    reduce_link = gpu.inter_node_gbps if train.nnodes > 1 else gpu.intra_node_gbps
    return {
        "all_to_all_gib_per_step_per_gpu": round(a2a / GIB, 2),
        "all_to_all_interconnect": f"{'intra' if a2a_link == gpu.intra_node_gbps else 'inter'}-node {a2a_link:g} GB/s",
        "all_to_all_s_per_step": round(a2a / (a2a_link * GB * constants.collective_efficiency), 2),
        "expert_grad_all_reduce_s": round(reduce_bytes / (reduce_link * GB * constants.collective_efficiency), 2),
    }


def checkpoint_interval_s(every_steps: int, every_minutes: float | None, step_s: float) -> float:
    """Training time between checkpoints: the step trigger or the time trigger, which the trainer checks at step
    ends (so it fires at the first step end past the minutes)."""
    by_steps = every_steps * step_s
    if not every_minutes or not step_s:
        return by_steps
    return min(by_steps, max(1, math.ceil(every_minutes * 60 / step_s)) * step_s)
