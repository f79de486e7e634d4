"""`finetune plan`: the recipe's own sharding measured on the meta device (fake process group), the fit verdicts
of the shipped profiles, and `finetune run` refusing a plan that does not fit before any stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoints import cli
from finetune.plan import PlanDoesNotFit, PlanError, check_fits, markdown, table
from finetune.plan.catalog import Constants
from finetune.plan.planner import plan
from finetune.plan.preemption import preemption
from finetune.plan.recipe import recipe_settings
from finetune.profile import REPO_ROOT, ProfileError, load_profile
from finetune.stage import PermanentError

JSON_KEYS = {"profile", "world_size", "gpu_memory_gib", "per_gpu_peak_gib", "breakdown", "host_memory_gib_per_node",
             "total_params", "trainable_params", "fits", "serving", "serving_fits", "checkpoint", "estimate"}


@pytest.fixture(autouse=True)
def _plan_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


PRODUCTION = ["scout-lora", "scout-sft", "scout-dpo", "maverick-lora", "maverick-sft"]
# maverick-lora as the issue-14 plan had it: 16 H100 without offload or expert parallelism (it cannot fit).
MAVERICK_ON_H100 = ["train.gpu_type=H100-80GB", "train.fsdp_cpu_offload=false", "train.expert_parallel=1",
                    "plan.trace=false"]
FORMULA_DECIDES = {"maverick-sft"}  # plan.trace: false in the profile, which says why
FORMULAS = ["plan.trace=false"]  # tests of the formulas' terms: seconds, not a traced step


@pytest.fixture(scope="module")
def maverick_lora() -> dict:
    return plan(load_profile("maverick-lora", MAVERICK_ON_H100))


@pytest.fixture(scope="module")
def production() -> dict[str, dict]:
    return {name: plan(load_profile(name, FORMULAS)) for name in PRODUCTION}


@pytest.mark.slow  # traces one full-size training step per profile on 2 units of layers (10-35 s each, loaded)
@pytest.mark.parametrize("name", PRODUCTION)
def test_every_production_profile_fits_with_five_percent_headroom_by_its_traced_step(name: str) -> None:
    result = plan(load_profile(name))
    traced = result["traced"]
    if name in FORMULA_DECIDES:
        assert traced is None
    else:
        assert result["per_gpu_peak_gib"] == traced["per_gpu_peak_gib"] != result["formula_peak_gib"]
        assert set(traced["phases_gib"]) == {"forward", "backward", "optimizer"}
        assert "layers (largest)" in traced["top_modules_gib"]
    assert result["fits"] and result["serving_fits"], result["knobs"]
    assert result["headroom_pct"] >= 5, result["per_gpu_peak_gib"]
    assert result["host_memory_gib_per_node"] <= 0.95 * result["host_ram_gib_per_node"]
    # The base checkpoint is read slice by slice: host RAM while loading is a few GiB per node, not N copies.
    assert result["host_breakdown"]["base_weights_while_loading"] < 16
    serve = result["serving"]["evaluate_and_benchmark"]
    assert serve["bf16"]["gpu"] == result["gpu"]  # serving runs in the profile's own GPU pool


@pytest.mark.parametrize("name", PRODUCTION)
def test_production_profiles_checkpoint_at_the_plans_young_daly_interval(name: str,
                                                                         production: dict[str, dict]) -> None:
    reclaim = production[name]["preemption"]
    assert reclaim["interval_min"] == reclaim["recommended_interval_min"], reclaim
    # Only the LoRA profiles' step and save fit a cloud's notice; full SFT's do not, whatever the grace says.
    assert reclaim["notice_save_fits"] is (name in ("scout-lora", "scout-dpo", "maverick-lora")), reclaim


def _reclaim(*overrides: str, step_s: float, save_s: float, stall_s: float) -> dict:
    estimate = {"step_s": step_s, "checkpoint_save_s": save_s, "checkpoint_training_stall_s": stall_s}
    profile = load_profile("scout-sft", list(overrides))
    return preemption(profile, estimate, Constants(spot_reclaim_mtbf_h=24), read_s=0.0,
                      async_save=recipe_settings(profile).async_save)


def test_a_blocking_save_that_exceeds_the_notice_is_balanced_against_the_loss_by_young_daly() -> None:
    # scout-sft's figures with blocking saves: 221 s step + 323 s save, 2 nodes (job MTBF 12 h).
    reclaim = _reclaim("train.async_checkpoint=false", "train.checkpoint_every_minutes=30", step_s=221, save_s=323,
                       stall_s=323)
    assert not reclaim["notice_save_fits"] and reclaim["clouds_where_it_fits"] == []
    assert reclaim["save_cost_pct"] == pytest.approx(100 * 323 / (9 * 221 + 323), abs=0.1)  # 30 min: 9 steps
    assert reclaim["lost_per_reclaim_min"] == pytest.approx((9 * 221 + 323) / 2 / 60, abs=0.1)
    assert reclaim["young_daly_min"] == pytest.approx((2 * 323 * 12 * 3600) ** 0.5 / 60, abs=0.1)
    assert reclaim["recommended_overhead_pct"] < reclaim["overhead_pct"]


def test_an_async_interval_is_at_least_one_write_and_a_notice_that_fits_loses_nothing() -> None:
    reclaim = _reclaim("train.checkpoint_every_minutes=1", step_s=221, save_s=323, stall_s=1.6)
    assert reclaim["interval_min"] == pytest.approx(221 / 60, abs=0.1)  # the time trigger fires at a step's end
    assert reclaim["recommended_interval_min"] == pytest.approx(2 * 221 / 60, abs=0.1)  # a write takes 1.5 steps
    small = _reclaim(step_s=20, save_s=5, stall_s=5)
    assert small["notice_save_fits"] and small["lost_per_reclaim_min"] == 0
    assert small["clouds_where_it_fits"] == ["AWS spot", "GCP spot", "Azure spot", "Kubernetes default"]


def test_tiny_cpu_fits_this_machine() -> None:
    result = plan(load_profile("tiny-cpu"))
    assert result["fits"] and result["serving_fits"]
    assert result["gpu"] == "cpu" and result["estimate"] is None


def test_scout_lora_fits_eight_h100() -> None:
    result = plan(load_profile("scout-lora", FORMULAS))
    assert (result["gpu"], result["world_size"]) == ("H100-80GB", 8)
    assert result["fits"], result
    assert 0 < result["per_gpu_peak_gib"] < result["gpu_memory_gib"]
    # 108B parameters in bf16 over 8 ranks: the FSDP shard of rank 0 is an eighth (plus padding).
    assert result["params_gib_per_gpu"] == pytest.approx(result["total_params"] * 2 / 8 / 2**30, rel=0.01)


def test_maverick_lora_does_not_fit_sixteen_h100_without_expert_parallelism(maverick_lora: dict) -> None:
    assert not maverick_lora["fits"]
    assert maverick_lora["per_gpu_peak_gib"] > maverick_lora["gpu_memory_gib"]
    # One whole 128-expert MoE layer is gathered at a time: ~32.6 GB.
    assert maverick_lora["largest_gathered_unit_gib"] == pytest.approx(32.6e9 / 2**30, rel=0.01)
    assert not maverick_lora["serving"]["evaluate_and_benchmark"]["bf16"]["fits"]  # 93.5 GiB of weights per H100


def test_check_fits_names_figures_and_knobs(monkeypatch: pytest.MonkeyPatch, maverick_lora: dict) -> None:
    monkeypatch.setattr("finetune.plan.plan", lambda profile: maverick_lora)
    with pytest.raises(PlanDoesNotFit) as error:
        check_fits(load_profile("maverick-lora", MAVERICK_ON_H100))
    assert isinstance(error.value, PermanentError)
    message = str(error.value)
    assert "GiB per GPU" in message and "79.6 GiB" in message and "train.gpu_type=H200-141GB" in message
    assert "train.expert_parallel=16: fits" in message
    check_fits(load_profile("maverick-lora", [*MAVERICK_ON_H100, "plan.enforce=false"]))  # a user who knows better goes on


def test_expert_parallel_holds_experts_whole_and_moves_tokens() -> None:
    """maverick-lora at EP 16 on 16 H100: 8 of 128 experts per MoE layer per GPU, never gathered (the largest FSDP
    unit is an embedding-sized one, not a 30 GiB MoE layer), tokens over the inter-node links; 4% headroom."""
    result = plan(load_profile("maverick-lora", ["train.gpu_type=H100-80GB", *FORMULAS]))
    assert result["expert_parallel"] == 16 and result["experts_per_gpu"] == 8
    # 24 MoE layers x 8 experts x 3 x 5120 x 8192 bf16 weights
    assert result["expert_gib_per_gpu"] == pytest.approx(24 * 8 * 3 * 5120 * 8192 * 2 / 2**30, rel=1e-3)
    assert result["largest_gathered_unit_gib"] < 2.5
    assert result["fits"] and result["headroom_pct"] == pytest.approx(4.0, abs=0.5)  # below the 5% bar
    estimate = result["estimate"]
    # tokens (1 x 8192 x 8 micro-batches) x 5120 x bf16 x top-1 x (dispatch + combine) x (forward, backward,
    # recompute) x 24 MoE layers x 15/16 leaving the GPU, over the nodes' links (EP 16 > 8 GPUs per node)
    a2a = 8192 * 8 * 5120 * 2 * 1 * 2 * 3 * 24 * 15 / 16
    assert estimate["all_to_all_gib_per_step_per_gpu"] == pytest.approx(a2a / 2**30, abs=0.01)
    assert estimate["all_to_all_interconnect"].startswith("inter-node")
    assert estimate["expert_grad_all_reduce_s"] == 0  # one replica: EP spans the world
    assert estimate["step_s"] > max(estimate["compute_s_per_step"], estimate["comm_s_per_step"])


def test_tiny_plan_with_replicated_experts_counts_two_whole_experts_per_rank() -> None:
    result = plan(load_profile("tiny-cpu", ["train.nproc_per_node=4", "train.expert_parallel=2"]))
    assert result["fits"] and (result["expert_parallel"], result["experts_per_gpu"]) == (2, 2)
    plain = plan(load_profile("tiny-cpu", ["train.nproc_per_node=4"]))
    # 4 experts per layer FSDP-sharded over 4 ranks (1 each) vs 2 whole experts per rank
    assert result["params_gib_per_gpu"] > plain["params_gib_per_gpu"]


def test_a_dpo_frozen_copy_is_sized_as_a_second_set_of_the_policys_shards() -> None:
    """Full-parameter DPO's reference (train.dpo.reference frozen_copy) holds the policy's parameter shards again,
    expert-parallel placement included; adapters_off holds nothing more."""
    dpo = ["train.method=dpo", "data.source=embedded/preferences", "data.format=preference",
           "train.nproc_per_node=2", "train.expert_parallel=2"]
    full = plan(load_profile("tiny-cpu", [*dpo, "train.dpo.tuning=full", "train.dpo.reference=frozen_copy"]))
    assert full["breakdown"]["reference_copy_params"] == full["breakdown"]["params"] > 0
    assert full["base_weight_load_peak_gib"] >= 2 * full["params_gib_per_gpu"]
    assert plan(load_profile("tiny-cpu", dpo))["breakdown"]["reference_copy_params"] == 0


def test_plan_refuses_an_expert_parallel_degree_the_model_cannot_take() -> None:
    # A recipe override passes the profile's check; the plan checks it against the built model, as the trainer does.
    with pytest.raises(PlanError, match=r"expert_parallel 3 does not divide the model's routed-expert count 4"):
        plan(load_profile("tiny-cpu", ["train.nproc_per_node=2", "train.recipe_overrides={expert_parallel: 3}"]))


def test_plan_json_has_the_documented_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", "--profile", "tiny-cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert JSON_KEYS <= set(result)
    assert "peak per GPU" in table(result) and markdown(result).startswith("### Plan: tiny-cpu")


def test_unknown_gpu_type_is_refused_when_the_profile_loads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ProfileError, match=r"train.gpu_type: unknown GPU type 'B300'; known: H100-80GB, H200-141GB"):
        load_profile("scout-lora", ["train.gpu_type=B300"])
    assert cli.main(["plan", "--profile", "scout-lora", "train.gpu_type=B300"]) == 2
    assert "unknown GPU type 'B300'" in capsys.readouterr().err


def test_an_unset_gpu_type_is_planned_and_launched_as_the_one_default() -> None:
    from finetune.plan.catalog import DEFAULT_GPU_TYPE, lookup
    from tasks.train.render import skypilot_task

    profile = load_profile("scout-lora", ["train.gpu_type=null"])
    assert lookup(profile.train.gpu_type).name == DEFAULT_GPU_TYPE == "H100-80GB"
    assert skypilot_task(profile, [], store="/store")["resources"]["accelerators"] == "H100:8"
    # SkyPilot's bare A100 is the 40 GB card: the catalog names the 80 GB one.
    a100 = load_profile("scout-lora", ["train.gpu_type=A100-80GB"])
    assert skypilot_task(a100, [], store="/store")["resources"]["accelerators"] == "A100-80GB:8"


def test_plan_exits_2_when_the_plan_does_not_fit(monkeypatch: pytest.MonkeyPatch, maverick_lora: dict,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("finetune.plan.plan", lambda profile: maverick_lora)
    assert cli.main(["plan", "--profile", "maverick-lora", "--json", *MAVERICK_ON_H100]) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out)["fits"] is False  # the plan is printed all the same
    assert "does not fit" in captured.err and "train.gpu_type=H200-141GB" in captured.err


def test_fsdp_shard_per_rank_is_total_over_world_size() -> None:
    from finetune.plan.model import measure, model_config
    from finetune.plan.recipe import recipe_settings

    profile = load_profile("tiny-cpu")
    measured = measure(profile, model_config(profile), recipe_settings(profile), world_size=4)
    # one unit per decoder layer, one each for the embeddings and the output, the root (final norm) apart
    assert measured.sharded and len(measured.units) == 6
    assert {unit.name for unit in measured.units} >= {"tok_embeddings", "output"}
    for unit in measured.units:
        # full SFT: every parameter trainable, so trainable_full_bytes is the unit's unpadded size
        assert unit.local_bytes == pytest.approx(unit.trainable_full_bytes / 4, rel=0.02)


def test_run_refuses_a_plan_that_does_not_fit_before_any_stage(tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "entrypoints.cli", "run", "--profile", "maverick-lora", "--store", str(store),
         *MAVERICK_ON_H100],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "does not fit" in done.stderr and "GiB" in done.stderr
    assert not store.exists() or not any(store.iterdir())


def test_the_plan_sizes_the_config_the_trainer_gets_recipe_overrides_included(tmp_path) -> None:
    from finetune.plan.recipe import recipe_settings
    from tasks.train.recipe_config import render_config

    overrides = "train.recipe_overrides={checkpoint.async_save: true, batch_size: 2, fsdp_reshard_after_forward: false}"
    profile = load_profile("scout-lora", [overrides])
    settings = recipe_settings(profile)
    rendered = render_config(profile.train, profile.data.max_seq_len, tmp_path, tmp_path, tmp_path)
    assert (settings.async_save, settings.batch_size, settings.reshard_after_forward) == (
        rendered["checkpoint"]["async_save"], rendered["batch_size"], rendered["fsdp_reshard_after_forward"]) == (
        True, 2, False)
    # The time estimate follows them too: an async save (scout-sft's 1.2 TiB) stalls training for the device-to-host
    # copy only, not for the whole write.
    plans = [plan(load_profile("scout-sft", [f"train.recipe_overrides={{checkpoint.async_save: {on}}}", *FORMULAS]))
             for on in ("false", "true")]
    blocking, overlapped = (result["estimate"] for result in plans)
    assert blocking["checkpoint_training_stall_s"] == blocking["checkpoint_save_s"] > 60
    assert overlapped["checkpoint_training_stall_s"] < 0.1 * blocking["checkpoint_training_stall_s"]
    # And what a reclaim loses: half a cycle of training and blocking save, not half an interval plus the write.
    reclaim = plans[0]["preemption"]
    assert reclaim["lost_per_reclaim_min"] == pytest.approx(
        (reclaim["interval_min"] + blocking["checkpoint_save_s"] / 60) / 2, abs=0.1)


def test_the_reclaim_table_names_each_platforms_delivery_and_whether_the_save_fits_it() -> None:
    # 21 s step + 15 s save: fits AWS's 120 s, not the 30 s of GCP, Azure and Kubernetes.
    rows = {row["platform"]: row for row in _reclaim("train.spot_notice=aws", step_s=21, save_s=15,
                                                      stall_s=15)["deliveries"]}
    assert {name: row["save_fits"] for name, row in rows.items()} == {
        "AWS spot": True, "GCP spot": False, "Azure spot": False, "Kubernetes default": False}
    assert rows["AWS spot"]["heard"] and "IMDSv2" in rows["AWS spot"]["delivery"]
    assert not rows["Azure spot"]["heard"]  # metadata only, and this profile polls AWS's
    assert rows["Kubernetes default"]["heard"] and "PID 1" in rows["Kubernetes default"]["delivery"]
    assert rows["GCP spot"]["heard"]  # its ACPI shutdown sends SIGTERM to every process


def test_the_plan_states_one_checkpoint_interval_the_step_or_time_trigger_whichever_first() -> None:
    planned = plan(load_profile("maverick-lora", FORMULAS))  # 200 steps of ~24 s, or 1.5 min: the minutes fire first
    interval = planned["estimate"]["checkpoint_interval_min"]
    assert interval == planned["preemption"]["interval_min"] < 200 * planned["estimate"]["step_s"] / 60
    text = markdown(planned)
    assert f"every 200 steps or 1.5 min, whichever comes first (~{interval:g} min)" in text
    assert f"checkpoints every ~{interval:g} min" in text
