"""The hub fixtures follow the published configs where public sources show them (../shared/notes/hub-configs.md;
sources S1-S8 are cited per fixture in tests/fixtures/README.md): one assertion per row of the notes' table."""

from __future__ import annotations

import pytest

from tests.llama4_fixtures import read

SCOUT, SCOUT_INSTRUCT = "Llama-4-Scout-17B-16E", "Llama-4-Scout-17B-16E-Instruct"
MAVERICK, MAVERICK_FP8 = "Llama-4-Maverick-17B-128E-Instruct", "Llama-4-Maverick-17B-128E-Instruct-FP8"
TEXT_ONLY, SAVED_BY_451 = "llama4-scout-text-only-finetune", "llama4-scout-saved-by-transformers-4.51"
INSTRUCT = (SCOUT_INSTRUCT, MAVERICK, MAVERICK_FP8)


def _text(name: str) -> dict:
    config = read(name)
    return config.get("text_config", config)


def test_scout_base_rope_scaling_is_the_revised_16_and_1() -> None:  # S1, S4 (llama-models PR #322)
    rope = _text(SCOUT)["rope_scaling"]
    assert (rope["factor"], rope["high_freq_factor"], rope["low_freq_factor"]) == (16.0, 1.0, 1.0)
    assert rope["original_max_position_embeddings"] == 8192 and rope["rope_type"] == "llama3"


def test_scout_base_no_rope_layers_is_empty() -> None:  # S1: transformers derives the pattern
    assert _text(SCOUT)["no_rope_layers"] == []


@pytest.mark.parametrize("key", ["attn_temperature_tuning", "attn_scale", "floor_scale", "cache_implementation",
                                 "moe_layers", "_attn_implementation_autoset"])
def test_scout_base_lacks_the_keys_the_hub_file_does_not_have(key: str) -> None:  # S1
    assert key not in _text(SCOUT)


def test_scout_base_ships_no_chat_template_and_ends_with_end_of_text() -> None:  # S3
    tokenizer = read(SCOUT, "tokenizer_config.json")
    assert "chat_template" not in tokenizer and tokenizer["eos_token"] == "<|end_of_text|>"
    assert all("chat_template" in read(name, "tokenizer_config.json") for name in INSTRUCT)


@pytest.mark.parametrize("name", INSTRUCT)
def test_instruct_generation_configs_sample(name: str) -> None:  # S3
    generation = read(name, "generation_config.json")
    assert (generation["do_sample"], generation["temperature"], generation["top_p"]) == (True, 0.6, 0.9)


def test_maverick_instruct_has_no_top_level_tie_word_embeddings() -> None:  # S2
    assert "tie_word_embeddings" not in read(MAVERICK)


def test_maverick_fp8_is_compressed_tensors_with_its_ignore_list_first() -> None:  # S7
    quant = read(MAVERICK_FP8)["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    keys = list(quant)
    assert keys.index("ignore") < keys.index("quant_method") and len(quant["ignore"]) > 90
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (weights["type"], weights["num_bits"]) == ("float", 8)  # FP8 weights ...
    assert quant["config_groups"]["group_0"]["input_activations"] is None  # ... 16-bit activations: W8A16


def test_text_only_finetune_of_scout_instruct_keeps_its_context_and_autoset_flag() -> None:  # S5, S6
    config = read(TEXT_ONLY)
    instruct = read(SCOUT_INSTRUCT)["text_config"]
    assert config["max_position_embeddings"] == 10485760 == instruct["max_position_embeddings"]
    assert config["_attn_implementation_autoset"] is True and config["transformers_version"] == "4.51.3"


def test_scout_and_maverick_match_s1_and_s2_where_they_show_values() -> None:
    scout, maverick = _text(SCOUT), _text(MAVERICK)
    assert {k: scout[k] for k in ("attention_chunk_size", "head_dim", "interleave_moe_layer_step", "intermediate_size",
                                  "intermediate_size_mlp", "num_attention_heads", "num_key_value_heads",
                                  "num_hidden_layers", "num_local_experts", "num_experts_per_tok", "pad_token_id",
                                  "rope_theta", "use_qk_norm")} == {
        "attention_chunk_size": 8192, "head_dim": 128, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
        "intermediate_size_mlp": 16384, "num_attention_heads": 40, "num_key_value_heads": 8, "num_hidden_layers": 48,
        "num_local_experts": 16, "num_experts_per_tok": 1, "pad_token_id": 200018, "rope_theta": 500000.0,
        "use_qk_norm": True}
    assert (maverick["interleave_moe_layer_step"], maverick["max_position_embeddings"], maverick["rope_scaling"],
            maverick["use_qk_norm"], maverick["num_local_experts"]) == (2, 1048576, None, False, 128)


def test_configs_saved_by_transformers_451_keep_their_own_fixture() -> None:  # S6, S8: int attn_temperature_tuning
    text = _text(SAVED_BY_451)
    assert text["attn_temperature_tuning"] == 4 and type(text["attn_temperature_tuning"]) is int
    assert read(SAVED_BY_451)["transformers_version"].startswith("4.51")
