"""Which expert-parallel degrees a run can use: one rule for the profile (checked at load, before any stage) and the
recipe (checked again against the real model config). No torch here: profiles load without it."""

from __future__ import annotations

# Routed experts per MoE layer of each model family (num_local_experts of the published configs and of
# embedded/tiny_model.py; tests/test_expert_parallel.py checks they agree).
ROUTED_EXPERTS = {"tiny": 4, "scout": 16, "maverick": 128}


def refusal(*, degree: int, experts: int, world_size: int, method: str, cpu_offload: bool = False) -> str | None:
    """Why expert_parallel ``degree`` cannot place ``experts`` routed experts over ``world_size`` processes training
    with ``method`` (and FSDP CPU offload); None when it can."""
    if degree == 1:
        return None
    if world_size == 1:
        return f"expert_parallel {degree} needs several processes (world size is 1): the experts have no ranks to go to"
    if method == "qlora":
        return (f"expert_parallel {degree} with method 'qlora': NF4 experts dequantize whole tensors, not "
                "expert-parallel shards; use expert_parallel 1 (FSDP shards the NF4 experts) or method 'lora'")
    if cpu_offload:
        return (f"expert_parallel {degree} with fsdp_cpu_offload: the experts live outside FSDP, which does the "
                "offloading; turn one of them off")
    problems = [f"{what} {number}" for what, number in (("the model's routed-expert count", experts),
                                                      ("the world size (nnodes x nproc_per_node)", world_size))
                if number % degree]
    if problems:
        return f"expert_parallel {degree} does not divide {' nor '.join(problems)}"
    return None
