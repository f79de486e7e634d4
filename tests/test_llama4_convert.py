"""HF <-> llama4tune weight conversion (per key and whole dict) and the Llama4HFCheckpointer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration

from llama4tune import llama4_from_hf_config, load_text_args, lora_llama4_from_hf_config
from llama4tune.checkpointer import Llama4HFCheckpointer
from llama4tune.convert import hf_to_tune, hf_to_tune_key, tune_to_hf, tune_to_hf_key, tune_to_peft_key
from llama4tune.reference import hf_reference_model, random_text_config

torch.set_num_threads(2)

TINY_VISION = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
               "image_size": 28, "patch_size": 14, "vision_output_dim": 32, "projector_input_dim": 32,
               "projector_output_dim": 32, "rope_theta": 10000}  # fmt: skip


def _saved_keys(state_dict: dict, tied: bool) -> dict:
    """What save_pretrained writes: a tied lm_head is not stored."""
    return {k: v for k, v in state_dict.items() if not (tied and k.endswith("lm_head.weight"))}


@pytest.mark.parametrize(
    "layout,overrides",
    [("scout", {}), ("maverick", {}), ("scout", {"tie_word_embeddings": True}), ("maverick", {"attention_bias": True})],
    ids=["scout", "maverick", "scout-tied", "maverick-bias"],
)
def test_llama4_hf_to_tune_to_hf_is_bit_exact(layout, overrides):
    cfg = random_text_config(layout, 11, **overrides)
    hf_sd = _saved_keys(hf_reference_model(cfg, 11).state_dict(), cfg["tie_word_embeddings"])
    tune_sd = hf_to_tune(hf_sd, cfg)
    # The tune state dict is exactly what the llama4tune model expects.
    assert set(tune_sd) == set(llama4_from_hf_config(cfg).state_dict())
    back = tune_to_hf(tune_sd, cfg)
    assert set(back) == set(hf_sd)
    assert all(torch.equal(back[k], hf_sd[k]) and back[k].dtype == hf_sd[k].dtype for k in hf_sd)


def test_llama4_multimodal_keys_convert_and_vision_is_skipped():
    text = random_text_config("maverick", 12)
    model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=TINY_VISION))
    hf_sd = model.state_dict()
    tune_sd = hf_to_tune(hf_sd, {"text_config": text})
    assert set(tune_sd) == set(llama4_from_hf_config(text).state_dict())
    back = tune_to_hf(tune_sd, text, multimodal_prefix=True)
    language = {k: v for k, v in hf_sd.items() if k.startswith("language_model.")}
    assert set(back) == set(language)
    assert all(torch.equal(back[k], language[k]) for k in language)


def test_llama4_per_key_mapping_documents_the_layout():
    args = load_text_args(random_text_config("maverick", 0))
    cases = {
        "model.layers.1.feed_forward.experts.gate_up_proj": "layers.1.mlp.experts.gate_up_proj",
        "language_model.model.layers.1.feed_forward.shared_expert.up_proj.weight": "layers.1.mlp.shared_expert.w3.weight",
        "model.layers.0.feed_forward.down_proj.weight": "layers.0.mlp.w2.weight",
        "model.layers.0.self_attn.o_proj.weight": "layers.0.attn.output_proj.weight",
        "model.layers.2.post_attention_layernorm.weight": "layers.2.mlp_norm.scale",
        "language_model.lm_head.weight": "output.weight",
    }
    for hf_key, tune_key in cases.items():
        assert hf_to_tune_key(hf_key, args) == tune_key
        assert tune_to_hf_key(tune_key, multimodal_prefix=hf_key.startswith("language_model.")) == hf_key
    assert hf_to_tune_key("vision_model.class_embedding", args) is None
    with pytest.raises(KeyError, match="unrecognised HF Llama 4 key"):
        hf_to_tune_key("model.layers.0.feed_forward.mystery.weight", args)
    with pytest.raises(KeyError, match="num_hidden_layers"):
        hf_to_tune_key(f"model.layers.{args.num_hidden_layers}.input_layernorm.weight", args)
    with pytest.raises(KeyError, match="no PEFT equivalent"):
        tune_to_peft_key("layers.1.mlp.experts.lora_gate_up_a")


def test_llama4_lora_keys_match_peft_adapter_names(monkeypatch):
    peft = pytest.importorskip("peft")
    import peft.tuners.lora.torchao as peft_torchao

    # peft 0.21 raises on torchao < 0.16 (we pin 0.11 for torchtune) when dispatching LoRA layers.
    monkeypatch.setattr(peft_torchao, "is_torchao_available", lambda: False)
    cfg = random_text_config("maverick", 13)
    model = lora_llama4_from_hf_config(
        cfg, lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
        apply_lora_to_output=True, lora_rank=4, lora_alpha=8,
    )  # fmt: skip
    ours = {tune_to_peft_key(k) for k in model.state_dict() if ".lora_" in k}
    hf_peft = peft.get_peft_model(
        hf_reference_model(cfg, 13),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj", "lm_head"]),
    )  # fmt: skip
    theirs = set(peft.get_peft_model_state_dict(hf_peft, save_embedding_layers=False))
    assert ours == theirs


def _hf_checkpoint(tmp_path, cfg, seed, multimodal=False):
    folder = tmp_path / "hf"
    if multimodal:
        torch.manual_seed(seed)
        model = Llama4ForConditionalGeneration(Llama4Config(text_config=cfg, vision_config=TINY_VISION)).eval()
    else:
        model = hf_reference_model(cfg, seed)
    # Small shards so the checkpointer must read several files through the index.
    model.save_pretrained(folder, max_shard_size="20KB")
    (folder / "tokenizer.json").write_text('{"fake": "tokenizer carried as a file"}')
    (folder / "original_repo_id.json").write_text(json.dumps({"repo_id": "meta-llama/tiny"}))
    return folder, model


def test_llama4_checkpointer_round_trip_loads_in_transformers(tmp_path):
    cfg = random_text_config("scout", 14)
    src, hf = _hf_checkpoint(tmp_path, cfg, 14)
    assert len(list(src.glob("*.safetensors"))) > 1
    ckpt = Llama4HFCheckpointer(src, "all", tmp_path / "out", max_shard_bytes=50_000)
    state = ckpt.load_checkpoint()
    model = llama4_from_hf_config(src / "config.json").eval()
    model.load_state_dict(state["model"], strict=True)
    tokens = torch.randint(0, cfg["vocab_size"], (1, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4

    ckpt.save_checkpoint({"model": model.state_dict()}, epoch=0)
    out = tmp_path / "out" / "epoch_0"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert shards[0].startswith("model-00001-of-")
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    reloaded = Llama4ForCausalLM.from_pretrained(out).eval()
    for key, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    with safe_open(str(out / shards[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_llama4_checkpointer_keeps_multimodal_checkpoints_multimodal(tmp_path):
    text = random_text_config("maverick", 15)
    src, hf = _hf_checkpoint(tmp_path, text, 15, multimodal=True)
    ckpt = Llama4HFCheckpointer(src, "all", tmp_path / "out")
    state = ckpt.load_checkpoint()
    model = llama4_from_hf_config(src).eval()
    model.load_state_dict(state["model"], strict=True)
    ckpt.save_checkpoint({"model": model.state_dict()}, epoch=1)
    reloaded = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "out" / "epoch_1")
    for key, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key

    text_only = Llama4HFCheckpointer(src, "all", tmp_path / "out_text", save_multimodal=False)
    text_only.save_checkpoint({"model": model.state_dict()}, epoch=0)
    causal = Llama4ForCausalLM.from_pretrained(tmp_path / "out_text" / "epoch_0").eval()
    tokens = torch.randint(0, text["vocab_size"], (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (causal(tokens).logits - model(tokens)).abs().max().item() <= 1e-4


def test_llama4_checkpointer_saves_adapter_in_peft_format_and_resumes(tmp_path):
    cfg = random_text_config("scout", 16)
    src, _ = _hf_checkpoint(tmp_path, cfg, 16)
    ckpt = Llama4HFCheckpointer(src, "all", tmp_path / "out")
    model = lora_llama4_from_hf_config(src, lora_attn_modules=["q_proj", "v_proj"], lora_rank=2, lora_alpha=4)
    model.load_state_dict(ckpt.load_checkpoint()["model"], strict=False)
    adapter = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    ckpt.save_checkpoint(
        {"adapter": adapter, "adapter_config": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
         "epochs_run": 1, "seed": 3},
        epoch=0, intermediate_checkpoint=True, adapter_only=True,
    )  # fmt: skip
    out = tmp_path / "out" / "epoch_0"
    peft_config = json.loads((out / "adapter_config.json").read_text())
    # Exact module names, every layer (a bare suffix would also match a multimodal base's vision tower).
    layers = range(cfg["num_hidden_layers"])
    assert peft_config["target_modules"] == sorted(f"model.layers.{i}.self_attn.{m}" for i in layers
                                                   for m in ("q_proj", "v_proj"))
    assert peft_config["base_model_name_or_path"] == "meta-llama/tiny"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == {tune_to_peft_key(k) for k in adapter}
    assert not list(out.glob("model-*.safetensors"))

    resumed = Llama4HFCheckpointer(src, "all", tmp_path / "out", should_load_recipe_state=True).load_checkpoint()
    assert resumed["epochs_run"] == 1 and resumed["seed"] == 3
    assert all(torch.equal(resumed["adapter"][k], v) for k, v in adapter.items())


def test_llama4_checkpointer_rejects_bad_input(tmp_path):
    cfg = random_text_config("scout", 17)
    src, _ = _hf_checkpoint(tmp_path, cfg, 17)
    with pytest.raises(FileNotFoundError, match="missing safetensors"):
        Llama4HFCheckpointer(src, ["nope.safetensors"], tmp_path / "out")
    with pytest.raises(ValueError, match="model_type"):
        Llama4HFCheckpointer(src, "all", tmp_path / "out", model_type="LLAMA3")
    with pytest.raises(ValueError, match="inside checkpoint_dir"):
        Llama4HFCheckpointer(src, "all", src / "out")
    with pytest.raises(FileNotFoundError, match="recipe_state"):
        Llama4HFCheckpointer(src, "all", tmp_path / "fresh", should_load_recipe_state=True)
