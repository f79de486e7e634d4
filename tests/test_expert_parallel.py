"""Expert parallelism (train.expert_parallel): a bad degree is refused before any stage, and on CPU (gloo, the tiny
model, fp32) EP=2 trains exactly as plain FSDP does on the same processes: same first loss, gradients and routing,
20 steps that stay together, a DCP save and resume, and checkpoints that convert to the same HF tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from embedded.tiny_model import TINY_TEXT_CONFIG, build_tiny_model
from finetune.profile import ProfileError, load_profile
from llama4tune.models import MAVERICK_TEXT_CONFIG, SCOUT_TEXT_CONFIG
from tasks.convert.checkpoint import convert_checkpoint
from tasks.convert.lora import LoraSpec
from tasks.convert.sources import DcpSource
from tests.gloo_ranks import REPO, run_ranks
from tunerecipes.ep_degree import ROUTED_EXPERTS


def test_routed_expert_counts_match_the_model_configs() -> None:
    configs = {"tiny": TINY_TEXT_CONFIG, "scout": SCOUT_TEXT_CONFIG, "maverick": MAVERICK_TEXT_CONFIG}
    assert ROUTED_EXPERTS == {family: config["num_local_experts"] for family, config in configs.items()}


@pytest.mark.parametrize("overrides, complaint", [
    (["train.nproc_per_node=2", "train.expert_parallel=3"],
     "train.expert_parallel 3 does not divide the model's routed-expert count 4 nor the world size "
     "(nnodes x nproc_per_node) 2"),
    (["train.nproc_per_node=6", "train.expert_parallel=3"], "does not divide the model's routed-expert count 4 "
                                                          "(model.family tiny)"),
    (["train.launcher=local-nodes", "train.nnodes=2", "train.expert_parallel=4"],
     "train.expert_parallel 4 does not divide the world size (nnodes x nproc_per_node) 2"),
    (["train.expert_parallel=2"], "needs several processes (world size is 1)"),
    (["train.nproc_per_node=2", "train.expert_parallel=2", "train.method=qlora"], "with method 'qlora'"),
    (["train.nproc_per_node=2", "train.expert_parallel=2", "train.dtype=bf16",
      "train.recipe_overrides={master_dtype: fp32}"], "with train.recipe_overrides.master_dtype fp32"),
])
def test_a_bad_expert_parallel_degree_is_refused_at_profile_load(overrides: list[str], complaint: str) -> None:
    with pytest.raises(ProfileError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
        load_profile("tiny-cpu", overrides)


def test_expert_parallel_degree_dividing_both_loads() -> None:
    assert load_profile("tiny-cpu", ["train.nproc_per_node=4", "train.expert_parallel=4"]).train.expert_parallel == 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("base") / "tiny")


def _converted(dcp_dir: Path, out: Path, method: str) -> dict[str, torch.Tensor]:
    """convert's own DCP reader and writer (adapters merged, as ep_rank.py's rank 4 / alpha 8 LoRA model has them)."""
    convert_checkpoint(DcpSource(dcp_dir), out, key_map=lambda key: key, dtype=torch.float32, max_shard_bytes=10**9,
                       lora=LoraSpec(rank=4, alpha=8.0) if method == "lora" else None)
    return load_file(next(out.glob("*.safetensors")))


@pytest.mark.slow  # starts 2 or 4 gloo processes
@pytest.mark.parametrize("world, method", [(2, "full"), (4, "lora")])
def test_expert_parallel_trains_as_plain_fsdp(tiny: Path, tmp_path: Path, world: int, method: str) -> None:
    """EP=2 over 2 processes (each holds 2 of the 4 experts) and over 4 (each expert on 2 replicas, whose gradients
    are reduced across them); LoRA with expert adapters and a trainable router, or full SFT."""
    run_ranks(REPO / "tests" / "ep_rank.py", [str(tiny), str(tmp_path), method, "2"], world, tmp_path / "logs")
    report = json.loads((tmp_path / "rank0.json").read_text())
    fsdp, ep = report["losses"]["fsdp"], report["losses"]["ep"]
    # One step from identical weights: same loss, every gradient, the same expert for every token.
    assert ep[0] == pytest.approx(fsdp[0], rel=1e-6)
    assert len(report["expert_grads"]) == (4 * 4 if method == "lora" else 4 * 2)
    assert max(report["grad_rel"].values()) <= 1e-5, sorted(report["grad_rel"].items(), key=lambda kv: -kv[1])[:3]
    assert report["first_routing_equal"] and report["flips"][0] == 0
    # 20 steps: float summation order differs (tokens meet their experts on other ranks), so a token near a tie
    # could switch expert; the run reports how many did.
    assert ep == pytest.approx(fsdp, rel=1e-2)
    flipped = sum(report["flips"])
    print(f"world {world} {method}: {flipped} of rank 0's {report['choices']} routing decisions flipped in 20 steps; "
          f"max loss difference {max(abs(a - b) / b for a, b in zip(ep, fsdp)):.2e} relative")
    assert flipped <= report["choices"] // 100
    # DCP save before the last step, resumed into fresh model and optimizer: the same last-step loss.
    assert report["resumed_last_loss"] == pytest.approx(ep[-1], rel=1e-6)
    # The same weights saved as DCP from both placements convert to the same HF tensors, experts fused [E, ...].
    plain = _converted(tmp_path / "fsdp", tmp_path / "hf-fsdp", method)
    parallel = _converted(tmp_path / "ep", tmp_path / "hf-ep", method)
    assert set(plain) == set(parallel)
    assert parallel["model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 128, 512)
    assert [key for key, value in plain.items() if not torch.equal(parallel[key], value)] == []


@pytest.mark.slow  # starts 2 gloo processes
def test_dpo_with_expert_parallelism_takes_the_plain_fsdp_step(tiny: Path, tmp_path: Path) -> None:
    """DPO's first step, EP=2 over 2 processes vs plain FSDP: the same loss and every gradient, with LoRA's
    adapters_off reference (expert adapters included) and with full fine-tuning's frozen copy placed like the policy."""
    run_ranks(REPO / "tests" / "ep_dpo_rank.py", [str(tiny), str(tmp_path), "2"], 2, tmp_path / "logs")
    report = json.loads((tmp_path / "rank0.json").read_text())
    for method, expert_grads in (("lora", 4 * 4), ("full", 4 * 2)):
        losses, grad_rel = report[method]["losses"], report[method]["grad_rel"]
        assert losses["ep"] == pytest.approx(losses["fsdp"], rel=1e-6), method
        assert abs(losses["fsdp"] - math.log(2)) > 1e-2, method  # reference and policy differ: a real DPO step
        assert len(report[method]["expert_grads"]) == expert_grads, method
        assert max(grad_rel.values()) <= 1e-5, (method, sorted(grad_rel.items(), key=lambda kv: -kv[1])[:3])


def test_gradient_clipping_over_meshes_clips_like_torch() -> None:
    """The recipe's clipping (one norm per mesh, combined) scales the parameters' gradients exactly as torch's
    clip_grad_norm_ does on one mesh; it once scaled nothing (it handed torch the gradients, whose .grad is None)."""
    from tunerecipes.expert_parallel import clip_grad_norm_

    torch.manual_seed(0)
    ours, theirs = ([torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(7))] for _ in range(2))
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a) * 3
        b.grad = a.grad.clone()
    total = clip_grad_norm_(ours, max_norm=1.0)
    assert total == pytest.approx(torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0).item())
    assert total > 1.0
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours])) == pytest.approx(1.0, rel=1e-5)
