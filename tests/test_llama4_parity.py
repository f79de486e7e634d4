"""llama4tune decoder vs transformers 5.17 Llama4ForCausalLM, packed input, grouped-mm vs loop.

Parity diffs are printed (run with `pytest -rP tests/test_llama4_parity.py` to see them) and
recorded as junit properties; the test ids name the config.
"""

from __future__ import annotations

import pytest
import torch
from torchtune.data import padded_collate_packed
from torchtune.modules import TransformerDecoder

from llama4tune import llama4_from_hf_config, llama4_maverick_17b_128e, llama4_scout_17b_16e, load_text_args
from llama4tune.convert import hf_to_tune
from llama4tune.moe import GroupedExperts, grouped_mm_supported
from llama4tune.reference import hf_reference_model, random_text_config

torch.set_num_threads(2)
TOL = 1e-4


def _tune_model(cfg: dict, hf_model: torch.nn.Module, **build_kwargs) -> TransformerDecoder:
    model = llama4_from_hf_config(cfg, **build_kwargs)
    model.load_state_dict(hf_to_tune(hf_model.state_dict(), cfg), strict=True)
    return model.eval()


PARITY_CASES = [
    pytest.param(layout, seed, seq_len, overrides, id=f"{layout}-seed{seed}-len{seq_len}{'-' + tag if tag else ''}")
    for layout, seed, seq_len, overrides, tag in [
        ("scout", 0, 7, {}, ""),
        ("scout", 1, 23, {}, ""),
        ("scout", 2, 41, {"num_experts_per_tok": 2}, "top2"),
        ("scout", 3, 33, {"tie_word_embeddings": True, "attention_bias": True}, "tied-bias"),
        ("maverick", 0, 9, {}, ""),
        ("maverick", 1, 29, {}, ""),
        ("maverick", 2, 40, {"use_qk_norm": True}, "qknorm"),
        ("maverick", 3, 31, {"num_hidden_layers": 8, "no_rope_layer_interval": 2}, "nope-every-2"),
        ("scout", 4, 30, {"num_hidden_layers": 5, "layer_types": ["chunked_attention", "full_attention",
                          "chunked_attention", "full_attention", "full_attention"]}, "explicit-layer-types"),
    ]
]


@pytest.mark.parametrize("layout,seed,seq_len,overrides", PARITY_CASES)
def test_llama4_logits_match_transformers(layout, seed, seq_len, overrides, record_property):
    cfg = random_text_config(layout, seed, **overrides)
    args = load_text_args(cfg)
    assert seq_len > args.attention_chunk_size, "sequence must cross the local-attention chunk"
    assert 0 in args.no_rope_layers, "config must contain NoPE (global) layers"
    hf = hf_reference_model(cfg, seed)
    model = _tune_model(cfg, hf)
    tokens = torch.randint(0, cfg["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
    diff = (got - expected).abs().max().item()
    record_property("max_abs_diff", diff)
    print(f"parity {layout} seed={seed} len={seq_len} {overrides}: max|diff|={diff:.3e}")
    assert got.shape == expected.shape
    assert diff <= TOL


def test_llama4_packed_documents_match_each_document_alone():
    cfg = random_text_config("scout", 5, attention_chunk_size=4, floor_scale=2)
    hf = hf_reference_model(cfg, 5)
    model = _tune_model(cfg, hf)
    gen = torch.Generator().manual_seed(5)
    lens = [11, 9]
    docs = [torch.randint(0, cfg["vocab_size"], (n,), generator=gen) for n in lens]
    pad = 3  # padding after the documents, packed as its own segment as torchtune's PackedDataset does
    pack = {
        "tokens": torch.cat([*docs, torch.zeros(pad, dtype=torch.long)]),
        "labels": torch.zeros(sum(lens) + pad, dtype=torch.long),
        "input_pos": torch.cat([torch.arange(n) for n in [*lens, pad]]),
        "seq_lens": torch.tensor([*lens, pad]),
    }
    batch = padded_collate_packed([pack])
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (1, 23, 23)
    with torch.no_grad():
        packed = model(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"])
        start = 0
        for doc in docs:
            alone = model(doc[None])
            reference = hf(doc[None]).logits
            piece = packed[:, start : start + len(doc)]
            assert (piece - alone).abs().max().item() <= 1e-5
            assert (piece - reference).abs().max().item() <= TOL
            start += len(doc)


def test_llama4_block_mask_path_matches_dense_mask():
    """The flex-attention path (BlockMask, what torchtune packs into on CUDA) gives the dense result."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    cfg = random_text_config("maverick", 6, attention_chunk_size=4)
    model = _tune_model(cfg, hf_reference_model(cfg, 6))
    lens = [10, 6]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    input_pos = torch.cat([torch.arange(n) for n in lens])[None]
    tokens = torch.randint(0, cfg["vocab_size"], (1, sum(lens)), generator=torch.Generator().manual_seed(6))

    def doc_causal(b, h, q, kv):
        return (q >= kv) & (doc_ids[q] == doc_ids[kv])

    block_mask = flex.create_block_mask(doc_causal, 1, None, sum(lens), sum(lens), device="cpu")
    dense = (doc_ids[:, None] == doc_ids[None, :]) & torch.ones(sum(lens), sum(lens), dtype=torch.bool).tril()
    with torch.no_grad():
        via_flex = model(tokens, mask=block_mask, input_pos=input_pos)
        via_dense = model(tokens, mask=dense[None], input_pos=input_pos)
    assert (via_flex - via_dense).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_llama4_grouped_mm_experts_match_loop(dtype):
    torch.manual_seed(0)
    experts = GroupedExperts(dim=32, hidden_dim=16, num_experts=4).to(dtype)
    x = torch.randn(13, 32, dtype=dtype)
    assert grouped_mm_supported(x, experts.gate_up_proj), "test dims must take the grouped-mm path"
    counts = torch.tensor([5, 0, 6, 2])  # an expert with no tokens included
    results = []
    for grouped in (True, False):
        experts.use_grouped_mm = grouped
        xi = x.clone().requires_grad_()
        experts.zero_grad()
        out = experts(xi, counts)
        out.float().pow(2).sum().backward()
        results.append((out.detach(), xi.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(*results):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def test_llama4_full_model_grouped_mm_matches_loop_with_gradients():
    cfg = random_text_config("scout", 7)
    hf = hf_reference_model(cfg, 7)
    grouped, loop = _tune_model(cfg, hf), _tune_model(cfg, hf, use_grouped_mm=False)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(7))
    outs = []
    for model in (grouped, loop):
        model.train()
        logits = model(tokens)
        logits.logsumexp(-1).mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert (outs[0][0] - outs[1][0]).abs().max().item() <= 1e-5
    for name, grad in outs[0][1].items():
        assert torch.allclose(grad, outs[1][1][name], atol=1e-5), name


def test_llama4_trains_in_bf16_on_packed_batch():
    cfg = random_text_config("maverick", 8)
    model = _tune_model(cfg, hf_reference_model(cfg, 8)).to(torch.bfloat16).train()
    pack = {
        "tokens": torch.randint(0, cfg["vocab_size"], (20,)),
        "labels": torch.zeros(20, dtype=torch.long),
        "input_pos": torch.cat([torch.arange(12), torch.arange(8)]),
        "seq_lens": torch.tensor([12, 8]),
    }
    batch = padded_collate_packed([pack, pack])
    logits = model(batch["tokens"], mask=batch["mask"], input_pos=batch["input_pos"])
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g.float()).all() for g in grads)


def _param_count_on_meta(builder) -> int:
    with torch.device("meta"):
        model = builder()
    return sum(p.numel() for p in model.parameters())


def test_llama4_real_size_builders_have_published_parameter_counts():
    # Published totals: Scout 109B, Maverick 400B (text decoder is nearly all of it).
    scout = _param_count_on_meta(llama4_scout_17b_16e)
    maverick = _param_count_on_meta(llama4_maverick_17b_128e)
    assert 105e9 < scout < 110e9, scout
    assert 390e9 < maverick < 402e9, maverick


def test_llama4_from_hf_config_reads_multimodal_config_and_derives_layers():
    text = random_text_config("maverick", 0)
    args = load_text_args({"model_type": "llama4", "text_config": text, "vision_config": {}})
    assert args.moe_layers == tuple(range(1, text["num_hidden_layers"], 2))
    assert args.no_rope_layers == tuple(int((i + 1) % 4 != 0) for i in range(text["num_hidden_layers"]))
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        load_text_args({**text, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        load_text_args({**text, "num_attention_heads": 3, "num_key_value_heads": 2})


def test_llama4_tiny_builds_the_embedded_tiny_model():
    tiny_model = pytest.importorskip("embedded.tiny_model")
    from llama4tune import llama4_tiny

    hf = tiny_model.init_tiny_model(seed=0)
    model = llama4_tiny()
    model.load_state_dict(hf_to_tune(hf.state_dict(), tiny_model.TINY_TEXT_CONFIG), strict=True)
    tokens = torch.randint(0, tiny_model.TINY_TEXT_CONFIG["vocab_size"], (1, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model.eval()(tokens) - hf(tokens).logits).abs().max().item()
    print(f"parity embedded tiny len=150: max|diff|={diff:.3e}")
    assert diff <= TOL


def test_llama4_meta_device_build_then_load_and_rope_init_matches_transformers():
    """The recipe path: build on meta, materialise, load weights with assign, recompute RoPE buffers."""
    cfg = random_text_config("scout", 9)
    hf = hf_reference_model(cfg, 9)
    with torch.device("meta"):
        model = llama4_from_hf_config(cfg)
    model.to_empty(device="cpu")
    model.load_state_dict(hf_to_tune(hf.state_dict(), cfg), strict=True, assign=True)
    for module in model.modules():
        if hasattr(module, "rope_init"):
            module.rope_init()
    tokens = torch.randint(0, cfg["vocab_size"], (1, 25), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (model.eval()(tokens) - hf(tokens).logits).abs().max().item() <= TOL
