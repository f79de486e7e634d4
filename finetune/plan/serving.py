"""Memory of the stages after training, where they run: the serving engine of evaluate and benchmark (bf16 and
4-bit), and llm-compressor's AWQ (the bf16 model in host RAM, one decoder layer at a time on the GPU)."""

from __future__ import annotations

import math
from typing import Any

from finetune.plan.catalog import GIB, Accelerator, Constants
from finetune.profile import Profile

BF16 = 2


def _layer_params(args: Any) -> tuple[list[tuple[str, int]], int]:
    """(name, parameters) of every weight class of the text decoder, and the largest decoder layer's parameters."""
    d, q, kv = args.hidden_size, args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    moe = sum(1 for i in range(args.num_hidden_layers) if args.is_moe_layer(i))
    dense = args.num_hidden_layers - moe
    experts = moe * args.num_local_experts * 3 * d * args.intermediate_size
    shared = moe * 3 * d * args.intermediate_size
    router = moe * d * args.num_local_experts
    mlp = dense * 3 * d * args.intermediate_size_mlp
    qkv = args.num_hidden_layers * d * (q + 2 * kv)
    o_proj = args.num_hidden_layers * q * d
    embeddings = 2 * args.vocab_size * d  # token embeddings and output (untied in Llama 4)
    largest = d * (q + 2 * kv) + q * d + max(
        (args.num_local_experts + 1) * 3 * d * args.intermediate_size + d * args.num_local_experts if moe else 0,
        3 * d * args.intermediate_size_mlp if dense else 0)
    return [("experts", experts), ("shared_expert", shared), ("dense_mlp", mlp), ("o_proj", o_proj),
            ("qkv", qkv), ("router", router), ("embeddings_and_output", embeddings)], largest


# Weight classes AWQ W4A16 quantizes (README: experts, shared expert, dense MLPs, attention o_proj).
QUANTIZED = {"experts", "shared_expert", "dense_mlp", "o_proj"}


def weight_bytes(args: Any, vision_params: float, *, four_bit: bool, group_size: int) -> float:
    """Checkpoint bytes: bf16, or W4A16 (4-bit weights plus a bf16 scale per group) where AWQ quantizes."""
    classes, _ = _layer_params(args)
    total = vision_params * BF16
    for name, count in classes:
        total += count * (0.5 + BF16 / group_size) if four_bit and name in QUANTIZED else count * BF16
    return total


def engine(args: Any, vision_params: float, *, tp: int, max_model_len: int, utilization: float,
           gpu: Accelerator, four_bit: bool, group_size: int, constants: Constants) -> dict[str, Any]:
    """vLLM at tensor parallel ``tp``: weights per GPU + KV cache of one max_model_len sequence must fit in the
    memory fraction vLLM takes."""
    weights = weight_bytes(args, vision_params, four_bit=four_bit, group_size=group_size) / tp / GIB
    kv_heads = math.ceil(args.num_key_value_heads / tp)  # vLLM replicates KV heads when tp exceeds them
    kv_per_token = args.num_hidden_layers * 2 * kv_heads * args.head_dim * BF16
    kv_one_sequence = kv_per_token * max_model_len / GIB
    budget = utilization * gpu.hbm_gib
    kv_room = budget - weights - constants.vllm_activation_reserve_gib
    return {
        "weights": "w4a16" if four_bit else "bf16",
        "tensor_parallel_size": tp,
        "gpu": gpu.name,
        "weights_gib_per_gpu": round(weights, 2),
        "activation_reserve_gib": constants.vllm_activation_reserve_gib,
        "kv_cache_gib_per_sequence": round(kv_one_sequence, 2),
        "vllm_budget_gib": round(budget, 2),
        "max_sequences_at_max_model_len": max(0, int(kv_room / kv_one_sequence)) if kv_one_sequence else 0,
        "fits": kv_room >= kv_one_sequence,
    }


def serving(profile: Profile, args: Any, vision_params: float, gpu: Accelerator, constants: Constants) -> dict[str, Any]:
    """evaluate (tuned and base, bf16) and benchmark (bf16 and 4-bit) where the profile runs them."""
    bench = profile.benchmark
    if profile.train.device == "cpu":  # a CPU profile serves on CPU: vLLM's CPU build, or the stand-in
        weights = weight_bytes(args, vision_params, four_bit=False, group_size=profile.quantize.group_size) / GIB
        return {"engine": bench.engine, "runs_on": "cpu", "weights_gib": round(weights, 3),
                "fits": weights < gpu.hbm_gib, "note": "on CPU: the model and its KV cache in host RAM"}
    common = dict(tp=bench.tensor_parallel_size, max_model_len=bench.max_model_len,
                  utilization=bench.gpu_memory_utilization, gpu=gpu, group_size=profile.quantize.group_size,
                  constants=constants)
    bf16 = engine(args, vision_params, four_bit=False, **common)  # type: ignore[arg-type]
    w4 = engine(args, vision_params, four_bit=True, **common)  # type: ignore[arg-type]
    # Only the weights the profile serves must fit: evaluate's (evaluate.weights) and the benchmark's.
    served = {profile.evaluate.weights, *bench.weights}
    out: dict[str, Any] = {"engine": "vllm", "bf16": bf16, "w4a16": w4, "served": sorted(served),
                           "fits": all({"bf16": bf16, "w4a16": w4}[name]["fits"] for name in served)}
    if bench.tensor_parallel_size > gpu.gpus_per_node:
        out["fits"] = False
        out["note"] = f"tensor_parallel_size {bench.tensor_parallel_size} exceeds the {gpu.gpus_per_node} GPUs of a node"
    return out


def quantization(profile: Profile, args: Any, vision_params: float, gpu: Accelerator, host_ram_gib: float,
                 constants: Constants) -> dict[str, Any]:
    """llm-compressor AWQ: the bf16 model in host RAM, one layer and its cached calibration inputs on the GPU."""
    settings = profile.quantize
    model = weight_bytes(args, vision_params, four_bit=False, group_size=settings.group_size)
    calibration = settings.calibration_samples * settings.calibration_seq_len * args.hidden_size * BF16
    host = (model * constants.quantize_host_overhead + calibration) / GIB
    _, largest_layer = _layer_params(args)
    gpu_layer = (largest_layer * BF16 + constants.awq_cached_activation_copies * calibration) / GIB
    on_gpu = settings.device == "cuda"
    return {
        "device": settings.device,
        "host_ram_gib": round(host, 2),
        "host_ram_available_gib": host_ram_gib,
        "gpu_gib_per_layer": round(gpu_layer, 2) if on_gpu else 0.0,
        "formula": "host = bf16 model x quantize_host_overhead + calibration inputs (samples x seq x d x 2 B); "
                   "GPU = largest decoder layer (bf16) + awq_cached_activation_copies x calibration inputs",
        "fits": host <= host_ram_gib and (not on_gpu or gpu_layer <= gpu.hbm_gib),
    }
