"""quantize: AWQ W4A16 of tiny Llama 4 models (text-only and multimodal) into compressed-tensors, reloaded and run."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from embedded.tokenizer import save_tokenizer
from finetune.packed import build_packs, write_meta, write_split
from finetune.profile import load_profile
from finetune.stage import PermanentError, StageContext, execute_stage
from finetune.store import Artifact, Store
from tasks import quantize
from tasks.quantize.calibration import load_calibration, window_starts
from tasks.quantize.llama4 import awq_mappings, decoder_layers, linearize_experts

GROUP = 32
# Layer 0 dense MLP, layer 1 MoE (interleave step 2, as in Maverick); hidden/intermediate sizes divisible by GROUP.
TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
    interleave_moe_layer_step=2, max_position_embeddings=256, attention_chunk_size=32, no_rope_layers=[1, 0],
    bos_token_id=0, eos_token_id=1, pad_token_id=5, tie_word_embeddings=False,
)
VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=56, patch_size=14,
    projector_input_dim=64, projector_output_dim=64, vision_output_dim=64, pixel_shuffle_ratio=0.5,
)
OVERRIDES = [f"quantize.group_size={GROUP}", "quantize.calibration_samples=4", "quantize.calibration_seq_len=32"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matmuls: extra threads only add synchronisation, and CI's 2 cores are shared.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build_model(out_dir: Path, multimodal: bool) -> Path:
    """A random fp32 Llama 4 checkpoint with the embedded tokenizer, as convert writes it (plus a LoRA adapter dir)."""
    from transformers import (
        GenerationConfig, Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig,
    )

    torch.manual_seed(0)
    if multimodal:
        model = Llama4ForConditionalGeneration(
            Llama4Config(text_config=TEXT_CONFIG, vision_config=VISION_CONFIG, image_token_index=500))
    else:
        model = Llama4ForCausalLM(Llama4TextConfig(**TEXT_CONFIG))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name:  # transformers leaves down_proj as torch.empty
                param.normal_(std=0.05)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=5, do_sample=False)
    model.to(torch.float32).save_pretrained(out_dir)
    save_tokenizer(out_dir)
    (out_dir / "adapter").mkdir()
    (out_dir / "adapter" / "adapter_config.json").write_text("{}")
    (out_dir / "tables.json").write_text('{"converted_shards": []}')  # the convert stage's own UI tables
    return out_dir


def build_pack(out_dir: Path, documents: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 30, size=documents)
    tokens = rng.integers(6, 500, size=int(lengths.sum())).astype(np.int32)
    packed = build_packs(tokens, tokens.copy(), lengths, max_seq_len=64, pad_id=5)
    write_split(out_dir, "train", packed)
    write_meta(out_dir, 64, 5, {"train": packed.stats()})
    return out_dir


@dataclass
class Quantized:
    source: Path
    artifact: Artifact
    tables: dict[str, list[dict[str, Any]]]

    @property
    def path(self) -> Path:
        return Path(self.artifact.path)

    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    def keys(self) -> set[str]:
        keys: set[str] = set()
        for shard in self.path.glob("*.safetensors"):
            with safe_open(shard, "pt") as handle:
                keys.update(handle.keys())
        return keys


def quantize_tiny(root: Path, multimodal: bool) -> Quantized:
    model = build_model(root / "convert", multimodal)
    pack = build_pack(root / "pack")
    inputs = {"convert": Artifact(stage="convert", key="c", path=str(model)),
              "pack": Artifact(stage="pack", key="p", path=str(pack))}
    artifact, tables = execute_stage(quantize.SPEC, load_profile("tiny-cpu", OVERRIDES), Store(root / "store"), inputs)
    return Quantized(model, artifact, tables)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Quantized:
    return quantize_tiny(tmp_path_factory.mktemp("text"), multimodal=False)


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory: pytest.TempPathFactory) -> Quantized:
    return quantize_tiny(tmp_path_factory.mktemp("mm"), multimodal=True)


# -- calibration ------------------------------------------------------------------------------------------------


def test_calibration_windows_come_from_document_tokens_only_and_are_deterministic(tmp_path: Path) -> None:
    pack = build_pack(tmp_path / "pack", documents=60)
    first = load_calibration(pack, samples=5, seq_len=16)
    again = load_calibration(pack, samples=5, seq_len=16)
    assert first.tokens.shape == (5, 16) and np.array_equal(first.tokens, again.tokens)

    tokens = np.load(pack / "train" / "tokens.npy")
    seq_lens, offsets = np.load(pack / "train" / "seq_lens.npy"), np.load(pack / "train" / "pack_offsets.npy")
    stream = np.concatenate([tokens[i, :seq_lens[offsets[i]:offsets[i + 1]].sum()] for i in range(len(tokens))])
    assert first.stream_tokens == stream.size < tokens.size  # the rows' padding is not calibration data
    starts, length = window_starts(stream.size, 5, 16)
    assert starts[0] == 0 and starts[-1] == stream.size - 16 and np.all(np.diff(starts) >= 16)
    for start, row in zip(starts, first.tokens):
        assert np.array_equal(row, stream[start:start + length])
    assert first.stats()["train_tokens"] == stream.size and first.stats()["tokens"] == 80


def test_calibration_shrinks_to_what_a_small_train_split_holds(tmp_path: Path) -> None:
    pack = build_pack(tmp_path / "pack", documents=4)
    stream = load_calibration(pack, samples=1, seq_len=1).stream_tokens
    fewer = load_calibration(pack, samples=100, seq_len=16)
    assert fewer.tokens.shape == (stream // 16, 16)
    whole = load_calibration(pack, samples=3, seq_len=stream + 50)
    assert whole.tokens.shape == (1, stream)
    assert whole.stats()["requested_seq_len"] == stream + 50


def test_calibration_names_a_missing_pack(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="meta.json not found"):
        load_calibration(tmp_path, samples=1, seq_len=8)


# -- AWQ mappings ----------------------------------------------------------------------------------------------


def test_awq_mappings_pair_every_norm_with_its_own_layer_on_interleaved_dense_and_moe(tmp_path: Path) -> None:
    from compressed_tensors.utils import match_modules_set
    from transformers import Llama4ForCausalLM

    model = Llama4ForCausalLM.from_pretrained(build_model(tmp_path / "m", multimodal=False))
    assert linearize_experts(model) == 1
    layers = decoder_layers(model)
    assert (layers.prefix, layers.moe, layers.dense) == ("model.layers", (1,), (0,))
    names = {module: name for name, module in model.named_modules()}

    post_norm_sets = {}
    for mapping in awq_mappings(layers):
        for smooth, *balance in match_modules_set(model, (mapping.smooth_layer, *mapping.balance_layers)):
            smooth_name = names[smooth[0]]
            balance_names = [names[m] for group in balance for m in group]
            layer = smooth_name.split(".")[2]
            assert all(n.split(".")[2] == layer for n in balance_names), (smooth_name, balance_names)
            if smooth_name.endswith("post_attention_layernorm"):
                post_norm_sets[smooth_name] = sorted(balance_names)
    assert post_norm_sets["model.layers.0.post_attention_layernorm"] == [
        "model.layers.0.feed_forward.gate_proj", "model.layers.0.feed_forward.up_proj"]
    moe = post_norm_sets["model.layers.1.post_attention_layernorm"]
    assert "model.layers.1.feed_forward.router" in moe
    assert len(moe) == 1 + 2 * 5  # router + gate/up of 4 routed experts and the shared expert


def test_calibrating_every_expert_feeds_each_token_once_and_keeps_the_layers_output(tmp_path: Path) -> None:
    """transformers hands the experts E copies of the tokens; upstream's calibrate-all mode ran every expert on all of
    them (E x the compute and the hooked activations: 95 s per AWQ grid point with 128 experts). Here every expert
    sees each token once, and the MoE layer's output is the upstream module's."""
    from llmcompressor.modeling.moe.context import moe_calibration_context
    from llmcompressor.modeling.moe.llama4 import Llama4LinearExperts
    from transformers import Llama4Config, Llama4ForCausalLM

    path = build_model(tmp_path / "m", multimodal=False)
    ours, upstream = (Llama4ForCausalLM.from_pretrained(path).eval() for _ in range(2))
    assert linearize_experts(ours) == 1
    experts = upstream.model.layers[1].feed_forward.experts
    upstream.model.layers[1].feed_forward.experts = Llama4LinearExperts.from_experts_module(
        experts, Llama4Config(text_config=upstream.config))
    rows: list[int] = []
    ours.model.layers[1].feed_forward.experts[2].gate_proj.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[0]))
    ids = torch.randint(16, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), moe_calibration_context():
        torch.testing.assert_close(ours(input_ids=ids).logits, upstream(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert rows == [2 * 24]  # each token once; upstream: 4 experts x 48 rows


# -- text-only model end to end ----------------------------------------------------------------------------------


def test_text_model_is_a_compressed_tensors_w4a16_checkpoint(text: Quantized) -> None:
    quant = text.config()["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "pack-quantized"
    assert quant["quantization_status"] == "compressed"
    (group,) = quant["config_groups"].values()
    assert group["weights"] | {"observer": None} == group["weights"] | {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP, "observer": None}
    assert group["input_activations"] is None  # A16: activations stay 16-bit
    assert set(quant["ignore"]) == {"lm_head", "model.layers.1.feed_forward.router"} | {
        f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkv"}
    assert text.config()["architectures"] == ["Llama4ForCausalLM"]
    files = {p.name for p in text.path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "recipe.yaml"} <= files
    assert "adapter" not in files and not any(name.startswith(".saving") for name in files)
    assert "tables.json" not in text.artifact.metrics["files"]  # the store's, not carried from convert
    assert set(json.loads((text.path / "tables.json").read_text())) == {"quantize", "quantize_summary",
                                                                         "quantize_routing"}
    assert (text.path / "tokenizer.json").read_bytes() == (text.source / "tokenizer.json").read_bytes()
    assert all((text.path / name).stat().st_mode & 0o044 == 0o044 for name in text.artifact.metrics["files"])
    recipe = (text.path / "recipe.yaml").read_text()
    assert "AWQModifier:" in recipe and "QuantizationModifier:" in recipe


def test_text_model_experts_are_int4_while_router_lm_head_and_qkv_stay_16_bit(text: Quantized) -> None:
    keys = text.keys()
    packed = {k.removesuffix(".weight_packed") for k in keys if k.endswith(".weight_packed")}
    assert packed == {
        *(f"model.layers.1.feed_forward.experts.{e}.{p}_proj" for e in range(4) for p in ("gate", "up", "down")),
        *(f"model.layers.1.feed_forward.shared_expert.{p}_proj" for p in ("gate", "up", "down")),
        *(f"model.layers.0.feed_forward.{p}_proj" for p in ("gate", "up", "down")),
        "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj",
    }
    for kept in ("lm_head.weight", "model.layers.1.feed_forward.router.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        assert kept in keys
    assert not any("gate_up_proj" in k for k in keys)  # no fused expert tensor left unquantized


def test_awq_rescales_norms_and_balances_the_router_so_its_logits_stay_exact(text: Quantized) -> None:
    before = load_file(text.source / "model.safetensors")
    after: dict[str, torch.Tensor] = {}
    for shard in text.path.glob("*.safetensors"):
        after.update(load_file(shard))
    norm = "model.layers.1.post_attention_layernorm.weight"
    router = "model.layers.1.feed_forward.router.weight"
    assert not torch.allclose(before[norm], after[norm])  # AWQ did smooth this norm
    # router(norm(x)) = (W_router * w_norm) @ x_hat: the product must survive the smoothing unchanged.
    torch.testing.assert_close(after[router] * after[norm], before[router] * before[norm], rtol=1e-4, atol=1e-6)


def test_text_model_reloads_in_transformers_on_cpu_and_generates_close_to_the_original(text: Quantized) -> None:
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(text.path, dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(text.source, dtype=torch.float32)
    assert type(quantized.model.layers[1].feed_forward.experts).__name__ == "SequentialLlama4TextExperts"
    prompt = torch.tensor([[0, 40, 41, 42, 43, 44, 45, 46]])
    with torch.no_grad():
        got, want = quantized(prompt).logits, original(prompt).logits
    assert torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95
    generated = quantized.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt.shape[1] and generated[0, :8].tolist() == prompt[0].tolist()


def test_weights_loaded_whole_give_the_same_checkpoint_as_sequential_onloading(text: Quantized, tmp_path: Path) -> None:
    inputs = {"convert": Artifact(stage="convert", key="c", path=str(text.source)),
              "pack": Artifact(stage="pack", key="p", path=str(text.source.parent / "pack"))}
    profile = load_profile("tiny-cpu", [*OVERRIDES, "quantize.sequential_onloading=false"])
    whole, _ = execute_stage(quantize.SPEC, profile, Store(tmp_path / "store"), inputs)
    assert whole.key == text.artifact.key and whole.metrics["sequential_onloading"] is False
    assert (Path(whole.path) / "model.safetensors").read_bytes() == (text.path / "model.safetensors").read_bytes()


def test_text_metrics_record_sizes_kinds_reasons_calibration_and_time(text: Quantized) -> None:
    metrics = text.artifact.metrics
    assert metrics["weights_bytes_before"] == (text.source / "model.safetensors").stat().st_size
    assert 0 < metrics["weights_bytes_after"] < metrics["weights_bytes_before"]
    assert metrics["quantized_modules"] == {
        "attention": {"modules": 2, "params": 2 * 64 * 64},
        "dense_mlp": {"modules": 3, "params": 3 * 64 * 128},
        "routed_expert": {"modules": 12, "params": 12 * 64 * 64},
        "shared_expert": {"modules": 3, "params": 3 * 64 * 64},
    }
    reasons = {row["kind"]: row["reason"] for row in metrics["unquantized"]}
    assert "quantize.ignore" in reasons["router"] and "quantize.ignore" in reasons["lm_head"]
    assert "permute" in reasons["attention"] and "not an nn.Linear" in reasons["embedding"]
    assert metrics["calibration"] | {"train_tokens": 0} == {
        "split": "train", "samples": 4, "seq_len": 32, "tokens": 128, "requested_samples": 4,
        "requested_seq_len": 32, "train_tokens": 0, "train_fraction": metrics["calibration"]["train_fraction"]}
    assert metrics["awq"]["mappings_smoothed"] >= 8 and 0 < metrics["awq"]["error_ratio_max"] <= 1.0
    assert metrics["expert_blocks_linearized"] == 1 and metrics["decoder_layers"] == {"moe": 1, "dense": 1}
    assert metrics["seconds"]["total"] > 0 and metrics["execution_device"] in ("cpu", "cuda:0")
    total = metrics["quantized_params"] + metrics["unquantized_params"]
    assert total == sum(math.prod(t.shape) for t in load_file(text.source / "model.safetensors").values())
    rows = text.tables["quantize"]
    assert {r["stored"] for r in rows} == {"int4 (W4A16)", "as in the source"} and all("why" in r for r in rows)
    assert text.tables["quantize_summary"][0]["metric"].startswith("weights MB")


def test_calibration_tokens_per_routed_expert_are_recorded_with_the_experts_under_the_floor(text: Quantized) -> None:
    routed = text.artifact.metrics["calibration_routing"]
    counts = routed["tokens_per_expert"]
    # One MoE layer (the second), 4 experts, top-1: the calibration forward's 4 x 32 tokens, counted once although
    # AWQ's grid search and the propagation pass run the layer again.
    assert list(counts) == ["model.layers.1"] and len(counts["model.layers.1"]) == 4
    assert sum(counts["model.layers.1"]) == 4 * 32
    floor = routed["min_tokens_per_expert"]
    assert floor == 64 and routed["experts"] == 4
    assert routed["experts_below_floor"] == [{"layer": "model.layers.1", "expert": expert, "tokens": tokens}
                                             for expert, tokens in enumerate(counts["model.layers.1"]) if tokens < floor]
    row = text.tables["quantize_routing"][0]
    assert row["fewest tokens"] == min(counts["model.layers.1"]) and row[f"experts under {floor}"] == len(
        routed["experts_below_floor"])


# -- multimodal model end to end ---------------------------------------------------------------------------------


def test_multimodal_model_quantizes_the_language_model_only_and_reloads(multimodal: Quantized) -> None:
    from transformers import Llama4ForConditionalGeneration

    keys = multimodal.keys()
    packed = {k.removesuffix(".weight_packed") for k in keys if k.endswith(".weight_packed")}
    assert packed and all(k.startswith("language_model.model.layers.") for k in packed)
    assert "language_model.model.layers.1.feed_forward.experts.3.down_proj" in packed
    assert "language_model.lm_head.weight" in keys  # plain 'lm_head' in the profile also covers the nested head
    ignore = set(multimodal.config()["quantization_config"]["ignore"])
    assert {"language_model.lm_head", "multi_modal_projector.linear_1", "vision_model.model.layers.0.mlp.fc1"} <= ignore
    vision = {row["reason"] for row in multimodal.artifact.metrics["unquantized"] if row["kind"] == "vision"}
    assert any("vision tower" in reason for reason in vision)

    model = Llama4ForConditionalGeneration.from_pretrained(multimodal.path, dtype=torch.float32)
    original = Llama4ForConditionalGeneration.from_pretrained(multimodal.source, dtype=torch.float32)
    prompt = torch.tensor([[0, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        got, want = model(input_ids=prompt).logits, original(input_ids=prompt).logits
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95
    assert model.generate(prompt, max_new_tokens=4, do_sample=False).shape[1] > prompt.shape[1]


def test_multimodal_4bit_checkpoint_also_loads_as_the_text_only_model_lm_eval_uses(multimodal: Quantized) -> None:
    from transformers import AutoModelForCausalLM, Llama4ForConditionalGeneration

    ignore = multimodal.config()["quantization_config"]["ignore"]
    assert {"lm_head", "model.layers.1.feed_forward.router", "model.layers.0.self_attn.q_proj"} <= set(ignore)
    text_only = AutoModelForCausalLM.from_pretrained(multimodal.path, dtype=torch.float32)
    full = Llama4ForConditionalGeneration.from_pretrained(multimodal.path, dtype=torch.float32)
    assert type(text_only).__name__ == "Llama4ForCausalLM"
    prompt = torch.tensor([[0, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        torch.testing.assert_close(text_only(prompt).logits, full(input_ids=prompt).logits)


# -- bad input ----------------------------------------------------------------------------------------------------


def _context(tmp_path: Path, model: Path, pack: Path, *overrides: str) -> StageContext:
    workdir = tmp_path / "work"
    workdir.mkdir(parents=True)
    return StageContext(profile=load_profile("tiny-cpu", [*OVERRIDES, *overrides]), key="k", workdir=workdir,
                        inputs={"convert": Artifact(stage="convert", key="c", path=str(model)),
                                "pack": Artifact(stage="pack", key="p", path=str(pack))})


def test_a_group_size_that_does_not_divide_the_layers_is_refused_by_name(tmp_path: Path) -> None:
    ctx = _context(tmp_path, build_model(tmp_path / "m", False), build_pack(tmp_path / "p"), "quantize.group_size=48")
    with pytest.raises(PermanentError, match="quantize.group_size 48 does not divide"):
        quantize.run(ctx)


def test_other_architectures_and_quantized_inputs_are_refused(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    pack = build_pack(tmp_path / "p")
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(PermanentError, match="'architectures' must be one of"):
        quantize.run(_context(tmp_path / "a", model, pack))
    (model / "config.json").write_text(json.dumps(
        {"architectures": ["Llama4ForCausalLM"], "quantization_config": {"quant_method": "compressed-tensors"}}))
    with pytest.raises(PermanentError, match="expects a bf16/fp32 checkpoint"):
        quantize.run(_context(tmp_path / "b", model, pack))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_before_loading(tmp_path: Path) -> None:
    ctx = _context(tmp_path, build_model(tmp_path / "m", False), build_pack(tmp_path / "p"), "quantize.device=cuda")
    with pytest.raises(PermanentError, match="quantize.device is 'cuda'"):
        quantize.run(ctx)


def test_key_ignores_where_weights_wait_but_not_what_shapes_the_result() -> None:
    base = load_profile("tiny-cpu", OVERRIDES)
    whole = load_profile("tiny-cpu", [*OVERRIDES, "quantize.sequential_onloading=false"])
    assert quantize.config(base) == quantize.config(whole)
    assert quantize.config(base) != quantize.config(load_profile("tiny-cpu", [*OVERRIDES, "quantize.group_size=64"]))
