"""Profiles are validated completely, with the field path and a fix, before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.profile import ProfileError, list_profiles, load_profile

SHIPPED = ["tiny-cpu", "scout-lora", "scout-qlora", "scout-sft", "maverick-lora", "maverick-sft"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_validate(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert name in list_profiles() and list_profiles()[name]


def test_production_profiles_have_the_documented_topologies() -> None:
    topology = {n: (load_profile(n).train.nnodes, load_profile(n).train.nproc_per_node) for n in SHIPPED[1:]}
    assert topology == {"scout-lora": (1, 8), "scout-qlora": (1, 1), "scout-sft": (2, 8), "maverick-lora": (2, 8),
                        "maverick-sft": (4, 8)}
    maverick_sft = load_profile("maverick-sft").train
    assert maverick_sft.expert_parallel == 32 and not maverick_sft.fsdp_cpu_offload
    assert maverick_sft.enable_dcp and maverick_sft.async_checkpoint


def test_extends_merges_mappings_and_keeps_parent_values() -> None:
    child = load_profile("maverick-lora")
    assert child.model.repo_id == "meta-llama/Llama-4-Maverick-17B-128E-Instruct"
    assert child.train.lora is not None and child.train.lora.rank == load_profile("scout-lora").train.lora.rank


def test_dotted_overrides_apply_with_yaml_types() -> None:
    profile = load_profile("tiny-cpu", ["train.lr=1e-4", "train.max_steps=7", "evaluate.tasks=[a, b]"])
    assert profile.train.lr == 1e-4 and profile.train.max_steps == 7 and profile.evaluate.tasks == ["a", "b"]


def test_unknown_key_names_its_path() -> None:
    with pytest.raises(ProfileError, match=r"train\.learning_rate: unknown key"):
        load_profile("tiny-cpu", ["train.learning_rate=1"])


def test_wrong_type_names_its_path_and_value() -> None:
    with pytest.raises(ProfileError, match=r"train\.batch_size: .*integer.*got 'four'"):
        load_profile("tiny-cpu", ["train.batch_size=four"])


def test_missing_data_file_names_the_field() -> None:
    with pytest.raises(ProfileError, match=r"data\.source: path 'nowhere\.jsonl' does not exist"):
        load_profile("tiny-cpu", ["data.source=nowhere.jsonl"])


def test_multi_node_needs_a_launcher_that_spans_nodes() -> None:
    with pytest.raises(ProfileError, match=r"nnodes 2 needs a launcher that spans nodes"):
        load_profile("tiny-cpu", ["train.nnodes=2"])
    assert load_profile("tiny-cpu", ["train.nnodes=2", "train.launcher=local-nodes"]).train.world_size == 2


def test_lora_method_without_lora_section_is_rejected() -> None:
    with pytest.raises(ProfileError, match=r"method 'lora' needs a 'lora:' section"):
        load_profile("scout-sft", ["train.method=lora"])  # tiny-cpu carries a lora: section for method overrides


@pytest.mark.parametrize("final_format", ["train.enable_dcp=true", "train.enable_dcp=false"])
def test_expert_lora_with_a_peft_adapter_is_refused_before_training_in_either_final_format(final_format: str) -> None:
    expert_lora = ["train.method=lora", "train.lora={rank: 4, alpha: 8, apply_to_experts: true}", final_format]
    with pytest.raises(ProfileError, match=r"set convert.keep_peft_adapter: false"):
        load_profile("tiny-cpu", expert_lora)
    assert load_profile("tiny-cpu", [*expert_lora, "convert.keep_peft_adapter=false"]).train.lora.apply_to_experts


def test_stage_concurrency_limits_are_positive() -> None:
    with pytest.raises(ProfileError, match=r"deploy.stage_concurrency.local-process"):
        load_profile("tiny-cpu", ["deploy.stage_concurrency={local-process: 0}"])


def test_vllm_serving_and_evaluation_are_allowed_on_cpu() -> None:
    profile = load_profile("tiny-cpu", ["evaluate.backend=vllm"])
    assert profile.benchmark.engine == "vllm" and profile.evaluate.backend == "vllm"


def test_extends_cycle_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ProfileError, match="cycle"):
        load_profile(str(tmp_path / "a.yaml"))


def test_profile_file_outside_the_repo_can_extend_a_shipped_one(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("extends: tiny-cpu\ndescription: mine\ntrain: {max_steps: 3}\n")
    profile = load_profile(str(path))
    assert profile.name == "mine" and profile.train.max_steps == 3 and profile.model.family == "tiny"


def test_hub_dataset_needs_a_commit_sha() -> None:
    with pytest.raises(ProfileError, match=r"data: hub dataset hf://datasets/org/chats needs revision"):
        load_profile("tiny-cpu", ["data.source=hf://datasets/org/chats", "data.revision=main"])
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert load_profile("tiny-cpu", ["data.source=hf://datasets/org/chats", f"data.revision={sha}"]).data.revision


def test_data_source_and_sources_are_exclusive_and_one_is_needed() -> None:
    mix = "data.sources=[{source: embedded/data, weight: 1}]"
    with pytest.raises(ProfileError, match=r"data: data\.source and data\.sources are exclusive"):
        load_profile("tiny-cpu", [mix])
    with pytest.raises(ProfileError, match=r"data: no data: set data\.source .* or data\.sources"):
        load_profile("tiny-cpu", ["data.source=null"])
    with pytest.raises(ProfileError, match=r"data\.revision pins data\.source; .* each source its own revision"):
        load_profile("tiny-cpu", ["data.source=null", mix, "data.revision=main"])
    sources = load_profile("tiny-cpu", ["data.source=null", mix, "data.format=sharegpt"]).data.all_sources()
    assert [(s.field, s.format, s.train_split, s.weight) for s in sources] == [
        ("data.sources.0.source", "sharegpt", "train", 1.0)]


def test_each_mix_source_is_checked_like_data_source() -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"

    def mix(second: str) -> list[str]:
        return ["data.source=null", f"data.sources=[{{source: embedded/data, weight: 1}}, {second}]"]

    with pytest.raises(ProfileError, match=r"data\.sources\.1\.source: path 'nowhere\.jsonl' does not exist"):
        load_profile("tiny-cpu", mix("{source: nowhere.jsonl, weight: 1}"))
    with pytest.raises(ProfileError, match=r"data\.sources\.1: .*hub dataset hf://datasets/org/chats needs revision"):
        load_profile("tiny-cpu", mix("{source: hf://datasets/org/chats, weight: 1}"))
    with pytest.raises(ProfileError, match=r"data\.sources\.0\.weight: .*greater than 0"):
        load_profile("tiny-cpu", ["data.source=null", "data.sources=[{source: embedded/data, weight: 0}]"])
    assert load_profile("tiny-cpu", mix(f"{{source: hf://datasets/org/chats, revision: '{sha}', weight: 2}}")).data
