"""The tiny Llama 4 builder: deterministic bytes, real Llama 4 features, loads and generates in transformers."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Llama4ForCausalLM

from embedded import tiny_model
from embedded.tokenizer import VOCAB_SIZE

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    torch.set_num_threads(2)
    return tiny_model.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_tiny_model_build_writes_hf_layout_and_no_temp_dirs(model_dir: pathlib.Path) -> None:
    assert {p.name for p in model_dir.iterdir()} == EXPECTED_FILES
    assert [p.name for p in model_dir.parent.iterdir()] == ["model"]


def test_tiny_model_build_is_byte_identical_across_processes(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    other = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "embedded.tiny_model", str(other)], cwd=REPO_ROOT, check=True)
    for name in sorted(EXPECTED_FILES):
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_tiny_model_seed_changes_weights() -> None:
    a = tiny_model.init_tiny_model(seed=0).state_dict()
    b = tiny_model.init_tiny_model(seed=1).state_dict()
    assert not torch.equal(a["model.layers.0.feed_forward.experts.down_proj"], b["model.layers.0.feed_forward.experts.down_proj"])


def test_tiny_model_refuses_to_overwrite_existing_output(model_dir: pathlib.Path) -> None:
    before = (model_dir / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        tiny_model.build_tiny_model(model_dir, seed=1)
    assert (model_dir / "model.safetensors").read_bytes() == before


def test_tiny_model_config_has_llama4_text_features(model_dir: pathlib.Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Llama4ForCausalLM"]
    assert config["model_type"] == "llama4_text"
    for key, value in tiny_model.TINY_TEXT_CONFIG.items():
        assert config[key] == value, key
    assert config["vocab_size"] == VOCAB_SIZE
    # Layer 3 is the NoPE global-attention layer; the others use RoPE with chunked local attention.
    assert config["layer_types"] == ["chunked_attention"] * 3 + ["full_attention"]
    assert config["moe_layers"] == [0, 1, 2, 3]
    assert config["attention_chunk_size"] < 256, "chunking must bite at the packed training length"
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tiny_model.EOS_ID, tiny_model.EOT_ID]
    assert generation["pad_token_id"] == tiny_model.PAD_ID


def test_tiny_model_loads_as_llama4_with_initialised_untied_weights(model_dir: pathlib.Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    assert isinstance(model, Llama4ForCausalLM)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    experts = model.model.layers[0].feed_forward.experts
    for param in (experts.gate_up_proj, experts.down_proj):
        assert torch.isfinite(param).all() and 0.01 < param.std().item() < 0.03
    assert not hasattr(model.model.layers[3].self_attn, "qk_norm"), "NoPE layer has no QK norm"
    assert hasattr(model.model.layers[0].self_attn, "qk_norm")


def test_tiny_model_generates_from_chat_prompt(model_dir: pathlib.Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "Reverse the letters: a b c"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[0] == 1 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 8
    assert int(out.max()) < VOCAB_SIZE


def test_tiny_model_save_and_reload_gives_identical_logits(model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    # Longer than the attention chunk so chunked and global layers both see several chunks.
    ids = torch.randint(16, VOCAB_SIZE, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, logits)


@pytest.mark.parametrize(("family", "experts", "moe_layers"), [("scout", 16, [0, 1, 2, 3]), ("maverick", 128, [1, 3])])
def test_embedded_model_in_a_family_shape_keeps_the_tiny_dims_loads_and_is_planned_so(
        family: str, experts: int, moe_layers: list[int], tmp_path: pathlib.Path) -> None:
    """A rehearsal's model: tiny dims, the family's experts / MoE interleave / qk-norm (what EP and AWQ must handle)."""
    from finetune.plan.model import model_config
    from finetune.profile import load_profile
    from llama4tune.models import (
        FAMILY_SHAPE_FIELDS,
        MAVERICK_TEXT_CONFIG,
        SCOUT_TEXT_CONFIG,
        embedded_text_config,
    )

    published = {"scout": SCOUT_TEXT_CONFIG, "maverick": MAVERICK_TEXT_CONFIG}[family]
    tiny_model.init_tiny_model(seed=0, family=family).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value in tiny_model.TINY_TEXT_CONFIG.items():
        assert config[key] == (published[key] if key in FAMILY_SHAPE_FIELDS else value), key
    assert config["num_local_experts"] == experts and config["moe_layers"] == moe_layers
    model = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    for index, layer in enumerate(model.model.layers):
        moe = hasattr(layer.feed_forward, "experts")
        assert moe == (index in moe_layers), index
        if moe:
            assert layer.feed_forward.experts.gate_up_proj.shape[0] == experts
    assert hasattr(model.model.layers[0].self_attn, "qk_norm") == published["use_qk_norm"]
    planned = model_config(load_profile("tiny-cpu", [f"model.family={family}"]))
    assert planned.text_config == embedded_text_config(family) and family in planned.origin
    assert embedded_text_config("tiny") == tiny_model.TINY_TEXT_CONFIG


def test_embedded_text_config_names_the_families_it_knows() -> None:
    from llama4tune.models import embedded_text_config

    with pytest.raises(ValueError, match="unknown model family 'behemoth' \\(known: tiny, scout, maverick\\)"):
        embedded_text_config("behemoth")
