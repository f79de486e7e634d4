"""One rank of tests/test_expert_parallel.py's DPO test (run as a script under a gloo process group): DPO's first
step with plain FSDP and with expert parallelism side by side, from identical weights, on the same per-rank packs of
pairs; LoRA with the adapters_off reference (adapters not zero, so policy and reference differ) or full fine-tuning
with a frozen copy (built and placed like the policy, the copy's weights perturbed so the two differ).

Writes <out>/rank<R>.json: per method (lora, full), each placement's loss over all ranks' pairs and the gradients'
relative differences.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from tests.ep_rank import build, full_grads, relative
from tunerecipes import expert_parallel
from tunerecipes.dpo import IGNORE_INDEX, DPOObjective, collate_pairs

warnings.simplefilter("ignore")
PAIRS, PROMPT, RESPONSE = 3, 5, 4  # per rank; each pair's chosen then rejected sequence in one pack


def pairs_batch() -> dict[str, torch.Tensor]:
    """One pack per pair: prompt + chosen, prompt + rejected (prompt masked), seeded by the rank."""
    generator = torch.Generator().manual_seed(100 + dist.get_rank())
    items = []
    for _ in range(PAIRS):
        prompt = torch.randint(0, 200, (PROMPT,), generator=generator)
        sequences = [torch.cat([prompt, torch.randint(0, 200, (RESPONSE,), generator=generator)]) for _ in range(2)]
        labels = [torch.cat([torch.full((PROMPT,), IGNORE_INDEX), seq[PROMPT:]]) for seq in sequences]
        items.append({"tokens": torch.cat(sequences), "labels": torch.cat(labels),
                      "input_pos": torch.arange(PROMPT + RESPONSE).repeat(2),
                      "seq_lens": torch.tensor([PROMPT + RESPONSE] * 2)})
    return collate_pairs(items)


def dpo_step(objective: DPOObjective, batch: dict[str, torch.Tensor]) -> float:
    """The recipe's DPO step: loss summed over the pairs, expert gradients reduced over replicas, all scaled by
    W / global pairs."""
    loss, pairs, _ = objective.micro_batch(batch)
    loss.backward()
    totals = torch.tensor([loss.item(), pairs], dtype=torch.float64)
    dist.all_reduce(totals)
    model = objective.model
    expert_parallel.reduce_grads(expert_parallel.expert_params(model), dist.get_world_size())
    for param in model.parameters():
        if param.grad is not None:
            param.grad.mul_(dist.get_world_size() / totals[1].item())
    return float(totals[0] / totals[1])


def objective(checkpoint: str, method: str, degree: int, out: Path) -> DPOObjective:
    section = {"loss": "sigmoid", "beta": 0.5, "label_smoothing": 0.0,
               "reference": "adapters_off" if method == "lora" else "frozen_copy"}
    policy = build(checkpoint, method, degree, out)
    if method == "lora":
        return DPOObjective(section, policy)
    reference = build(checkpoint, method, degree, out).requires_grad_(False)
    with torch.no_grad():  # the same perturbation in both placements: every weight scaled by 1.2
        for param in reference.parameters():
            param.mul_(1.2)
    return DPOObjective(section, policy, reference)


def main() -> None:
    torch._C._set_print_stack_traces_on_fatal_signal(True)
    checkpoint, out, degree = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    batch = pairs_batch()
    report = {}
    for method in ("lora", "full"):
        objectives = {name: objective(checkpoint, method, d, out) for name, d in (("fsdp", 1), ("ep", degree))}
        losses = {name: dpo_step(obj, batch) for name, obj in objectives.items()}
        plain, ep = full_grads(objectives["fsdp"].model), full_grads(objectives["ep"].model)
        assert set(plain) == set(ep), set(plain) ^ set(ep)
        report[method] = {"losses": losses, "grad_rel": {k: relative(ep[k], plain[k]) for k in plain},
                          "expert_grads": sorted(k for k in plain if ".experts." in k)}
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
