"""The traced plan (finetune/plan/trace.py): one training step on fake tensors under a memory tracker, with the MoE
layers' tokens per expert planned (llama4tune/moe.py's planned_routing) since fake tensors hold no routing."""

from __future__ import annotations

import pytest
import torch

from finetune.plan.model import model_config
from finetune.plan.recipe import recipe_settings
from finetune.plan.trace import layered_trace, routing_counts, trace
from finetune.profile import load_profile
from llama4tune.config import first_layers, layer_period, load_text_args
from llama4tune.models import MAVERICK_TEXT_CONFIG, SCOUT_TEXT_CONFIG, TINY_TEXT_CONFIG
from llama4tune.moe import GroupedExperts, Llama4MoE, planned_routing


def test_skewed_routing_gives_the_hot_experts_the_imbalance_and_keeps_every_row() -> None:
    counts = routing_counts(1.25, hot=4)(16, 1600)
    assert sum(counts) == 1600 and counts[:4] == [125] * 4 and max(counts[4:]) - min(counts[4:]) <= 1
    assert routing_counts(1.0, hot=1)(4, 10) == [3, 3, 2, 2]
    assert routing_counts(100.0, hot=2)(4, 10) == [5, 5, 0, 0]  # never more rows than there are


def test_a_moe_layer_with_its_own_counts_planned_computes_what_it_computes_unplanned() -> None:
    torch.manual_seed(0)
    experts = GroupedExperts(dim=16, hidden_dim=32, num_experts=4)
    moe = Llama4MoE(router=torch.nn.Linear(16, 4, bias=False), experts=experts,
                    shared_expert=torch.nn.Linear(16, 16), top_k=1)
    x = torch.randn(2, 5, 16)
    chosen = torch.topk(moe.router(x.reshape(-1, 16)), 1, dim=1).indices.reshape(-1)
    real = torch.bincount(chosen, minlength=4).tolist()
    with planned_routing(lambda num, rows: real):
        planned = moe(x)
    assert torch.equal(planned, moe(x))


def _traced(overrides: list[str]) -> dict:
    profile = load_profile("tiny-cpu", overrides)
    return trace(profile, model_config(profile).text_config, recipe_settings(profile), profile.data.max_seq_len)


@pytest.mark.slow  # two traced steps of the tiny model over a fake world of 4 (~20 s on 2 loaded cores)
def test_the_trace_follows_the_hottest_expert_parallel_rank() -> None:
    ep = ["train.method=lora", "train.nproc_per_node=4", "train.expert_parallel=2"]
    uniform = _traced([*ep, "plan.routing=uniform"])
    skewed = _traced([*ep, "plan.routing_imbalance=1.9"])
    assert set(uniform["phases"]) == {"forward", "backward", "optimizer"}
    # Rank 0 owns the hot experts: it receives more tokens, and keeps more for backward.
    peak = {name: max(sum(terms.values()) for terms in result["phases"].values())
            for name, result in (("uniform", uniform), ("skewed", skewed))}
    assert peak["skewed"] > peak["uniform"]
    assert "layers (largest)" in uniform["top_modules_gib"]


@pytest.mark.slow  # one traced QLoRA step of the tiny model in one process (~30 s on 2 loaded cores)
def test_a_single_process_qlora_step_traces_with_its_frozen_nf4_base() -> None:
    result = _traced(["train.method=qlora"])
    assert all(sum(terms.values()) > 0 for terms in result["phases"].values())


def test_the_repeating_unit_is_four_layers_in_scout_and_maverick_and_a_cut_keeps_each_layers_kind() -> None:
    scout, maverick = load_text_args(SCOUT_TEXT_CONFIG), load_text_args(MAVERICK_TEXT_CONFIG)
    assert layer_period(scout) == layer_period(maverick) == 4  # NoPE every 4th layer; Maverick: MoE every 2nd
    cut = load_text_args(first_layers(MAVERICK_TEXT_CONFIG, 8))
    assert (cut.num_hidden_layers, cut.moe_layers) == (8, (1, 3, 5, 7))
    assert cut.no_rope_layers == maverick.no_rope_layers[:8] and cut.layer_types == maverick.layer_types[:8]
    with pytest.raises(ValueError, match="layers must lie in 1..48"):
        first_layers(SCOUT_TEXT_CONFIG, 49)


@pytest.mark.slow  # three traced LoRA steps of a 12-layer tiny model over a fake world of 2 (~15 s on 2 loaded cores)
def test_the_trace_of_two_units_extrapolated_is_the_trace_of_the_whole_model() -> None:
    profile = load_profile("tiny-cpu", ["train.method=lora", "train.nproc_per_node=2"])
    twelve = {**TINY_TEXT_CONFIG, "num_hidden_layers": 12, "no_rope_layers": TINY_TEXT_CONFIG["no_rope_layers"] * 3}
    settings = recipe_settings(profile)
    layered = layered_trace(profile, twelve, settings, profile.data.max_seq_len)
    whole = trace(profile, twelve, settings, profile.data.max_seq_len)
    assert layered["layers_traced"].startswith("4 and 8 of 12")
    for phase, terms in whole["phases"].items():
        assert sum(layered["phases"][phase].values()) == pytest.approx(sum(terms.values()), rel=0.005), phase
