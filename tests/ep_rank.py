"""One rank of tests/test_expert_parallel.py (run as a script under a gloo process group): the same tiny model, with
identical weights, trained side by side with plain FSDP and with expert parallelism, on the same per-rank batches.

Writes <out>/rank<R>.json: step-1 loss and gradient differences, routing choices, 20-step losses and routing flips,
and (EP) the next-step loss after a DCP save and resume; and <out>/{fsdp,ep}: each model's initial DCP state dict.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torchtune.modules.peft import get_adapter_params, set_trainable_params

from llama4tune import llama4_from_hf_config, lora_llama4_from_hf_config
from llama4tune.checkpointer import Llama4HFCheckpointer
from llama4tune.moe import Llama4MoE
from tunerecipes import base_weights, sharding
from tunerecipes import checkpointing as ckpt
from tunerecipes import expert_parallel

warnings.simplefilter("ignore")
STEPS, BATCH, SEQ = 20, 2, 24


def build(checkpoint: str, method: str, degree: int, out: Path) -> torch.nn.Module:
    """The recipe's order: build on meta, activation checkpointing, experts placed, FSDP, materialise, load."""
    with torch.device("meta"):
        if method == "lora":
            model = lora_llama4_from_hf_config(checkpoint, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True,
                                               apply_lora_to_experts=True, train_router=True, lora_rank=4, lora_alpha=8)
        else:
            model = llama4_from_hf_config(checkpoint)
    sharding.checkpoint_activations(model)
    ignored = None
    if degree > 1:
        ignored = expert_parallel.place_experts(model, expert_parallel.mesh("cpu", dist.get_world_size(), degree))
    sharding.shard(model, cpu_offload=False, reshard_after_forward=True, ignored=ignored)
    model.to_empty(device="cpu")
    adapters = set(get_adapter_params(model))
    index = Llama4HFCheckpointer(checkpoint, output_dir=out / "reader").tensor_index()
    base_weights.load(model, index, skip={k for k in model.state_dict() if "lora_" in k})
    # Adapters from one seeded full tensor each (B not zero: every adapter gets a gradient), the local slice kept.
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in sorted(model.state_dict(keep_vars=True).items()):
            if "lora_" in name:
                full = torch.randn(param.shape, generator=generator) * 0.05
                local = param.to_local() if hasattr(param, "to_local") else param
                local.copy_(full[base_weights.local_slices(param)])
    for module in model.modules():
        if hasattr(module, "rope_init"):
            module.rope_init()
    if method == "lora":
        set_trainable_params(model, adapters)
    return model


def record_routing(model: torch.nn.Module) -> list[torch.Tensor]:
    """Each MoE layer's expert choices in forward (not again in activation checkpointing's recompute)."""
    choices: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: object, logits: torch.Tensor) -> None:
        if torch._C._current_graph_task_id() == -1:  # -1: outside backward
            choices.append(torch.topk(logits.detach(), 1, dim=1).indices.flatten())

    for module in model.modules():
        if isinstance(module, Llama4MoE):
            module.router.register_forward_hook(hook)
    return choices


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(expert_parallel.param_groups(params), lr=2e-3)


def batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    return torch.randint(0, 200, (BATCH, SEQ), generator=generator)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    """The recipe's step: summed loss, expert gradients reduced over replicas, all scaled by W / global tokens."""
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    totals = torch.tensor([loss.item(), tokens[:, 1:].numel()], dtype=torch.float64)
    dist.all_reduce(totals)
    expert_parallel.reduce_grads(expert_parallel.expert_params(model), dist.get_world_size())
    for param in model.parameters():
        if param.grad is not None:
            param.grad.mul_(dist.get_world_size() / totals[1].item())
    return float(totals[0] / totals[1])


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    # On a crash, every thread's C++ stack (gloo's included), then faulthandler's Python stacks (tests/gloo_ranks.py).
    torch._C._set_print_stack_traces_on_fatal_signal(True)
    checkpoint, out, method, degree = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    models = {"fsdp": build(checkpoint, method, 1, out), "ep": build(checkpoint, method, degree, out)}
    routing = {name: record_routing(model) for name, model in models.items()}
    optimizers = {name: optimizer(m) for name, m in models.items()}
    report: dict = {"losses": {"fsdp": [], "ep": []}, "flips": [], "choices": 0}
    for name, model in models.items():  # as the recipe's final DCP checkpoint; the same weights in both
        torch.distributed.checkpoint.save({"model": get_model_state_dict(model)}, checkpoint_id=str(out / name))
    for step in range(STEPS):
        tokens = batch(step)
        for name in models:
            routing[name].clear()
            report["losses"][name].append(train_step(models[name], optimizers[name], tokens))
        if step == 0:
            plain, ep = full_grads(models["fsdp"]), full_grads(models["ep"])
            assert set(plain) == set(ep), set(plain) ^ set(ep)
            report["grad_rel"] = {k: relative(ep[k], plain[k]) for k in plain}
            report["expert_grads"] = sorted(k for k in plain if ".experts." in k)
            report["first_routing_equal"] = all(torch.equal(a, b) for a, b in zip(routing["fsdp"], routing["ep"]))
        flips = sum(int((a != b).sum()) for a, b in zip(routing["fsdp"], routing["ep"]))
        report["flips"].append(flips)
        report["choices"] += sum(a.numel() for a in routing["fsdp"])
        for name in models:
            expert_parallel.clip_grad_norm_([p for p in models[name].parameters() if p.requires_grad], 1.0)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        if step == STEPS - 2:  # DCP save of the EP run before its last step, resumed below into fresh objects
            writer = ckpt.CheckpointWriter(out / "ckpt", rank=rank, keep_last=1, async_save=False)
            writer.save(step + 1, ckpt.training_state(models["ep"], optimizers["ep"], trainable_only=method == "lora"))
    resumed = build(checkpoint, method, degree, out)
    resumed_opt = optimizer(resumed)
    state = ckpt.training_state(resumed, resumed_opt, trainable_only=method == "lora")
    ckpt.load(out / "ckpt" / f"step_{STEPS - 1}", state)
    ckpt.restore_training_state(resumed, resumed_opt, state)
    report["resumed_last_loss"] = train_step(resumed, resumed_opt, batch(STEPS - 1))
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
