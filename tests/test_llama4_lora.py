"""LoRA on the llama4tune decoder: merge equivalence, frozen router/experts, PEFT equivalence."""

from __future__ import annotations

import pytest
import torch
from torchtune.modules.peft import get_adapter_params, get_merged_lora_ckpt, set_trainable_params

from llama4tune import llama4_from_hf_config, lora_llama4_from_hf_config
from llama4tune.convert import hf_to_tune, tune_to_peft_key
from llama4tune.lora import merge_lora_state_dict
from llama4tune.reference import hf_reference_model, random_text_config

torch.set_num_threads(2)
RANK, ALPHA = 4, 8.0
ALL_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]


def _lora_model(cfg: dict, seed: int, **lora_kwargs) -> tuple[torch.nn.Module, dict]:
    """LoRA model with base weights from an HF reference and non-zero (random) adapters."""
    base = hf_to_tune(hf_reference_model(cfg, seed).state_dict(), cfg)
    model = lora_llama4_from_hf_config(cfg, lora_rank=RANK, lora_alpha=ALPHA, **lora_kwargs)
    missing, unexpected = model.load_state_dict(base, strict=False)
    assert not unexpected and set(missing) <= set(get_adapter_params(model)), "only adapters may be absent"
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in get_adapter_params(model).values():
            if param.abs().sum() == 0:  # B matrices start at zero: make adapters change the output
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    return model.eval(), base


@pytest.mark.parametrize(
    "layout,lora_kwargs",
    [
        ("scout", {"lora_attn_modules": ALL_ATTN, "apply_lora_to_mlp": True, "apply_lora_to_output": True}),
        ("maverick", {"lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": True,
                      "apply_lora_to_experts": True, "train_router": True}),
    ],
    ids=["scout-attn-mlp-output", "maverick-experts-router"],
)
def test_llama4_merged_lora_model_matches_adapter_model(layout, lora_kwargs):
    cfg = random_text_config(layout, 21)
    model, base = _lora_model(cfg, 21, **lora_kwargs)
    merged = merge_lora_state_dict(model.state_dict(), rank=RANK, alpha=ALPHA)
    assert set(merged) == set(base)
    plain = llama4_from_hf_config(cfg).eval()
    plain.load_state_dict(merged, strict=True)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_adapters, base_logits = model(tokens), plain(tokens)
        assert (with_adapters - base_logits).abs().max().item() <= 1e-5
        original = llama4_from_hf_config(cfg).eval()
        original.load_state_dict(base, strict=True)
        assert (original(tokens) - with_adapters).abs().max().item() > 1e-3, "adapters must change the output"


def test_llama4_merge_agrees_with_torchtune_get_merged_lora_ckpt():
    cfg = random_text_config("scout", 22)
    model, _ = _lora_model(cfg, 22, lora_attn_modules=ALL_ATTN, apply_lora_to_mlp=True)
    ours = merge_lora_state_dict(model.state_dict(), rank=RANK, alpha=ALPHA)
    theirs = get_merged_lora_ckpt({k: v.clone() for k, v in model.state_dict().items()}, rank=RANK, alpha=ALPHA)
    assert set(ours) == set(theirs)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_llama4_lora_freezes_router_and_experts_unless_configured():
    cfg = random_text_config("maverick", 23)
    default, _ = _lora_model(cfg, 23, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=True)
    set_trainable_params(default, get_adapter_params(default))
    trainable = {n for n, p in default.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert any("shared_expert.w1.lora_a" in n for n in trainable) and any(".mlp.w1.lora_a" in n for n in trainable)

    configured, _ = _lora_model(
        cfg, 23, lora_attn_modules=["q_proj"], apply_lora_to_experts=True, train_router=True
    )
    set_trainable_params(configured, get_adapter_params(configured))
    trainable = {n for n, p in configured.named_parameters() if p.requires_grad}
    moe = cfg["interleave_moe_layer_step"] - 1
    assert f"layers.{moe}.mlp.router.weight" in trainable
    assert f"layers.{moe}.mlp.experts.lora_gate_up_a" in trainable
    assert f"layers.{moe}.mlp.experts.gate_up_proj" not in trainable

    # One optimizer step moves adapters only.
    before = {n: p.detach().clone() for n, p in default.named_parameters()}
    opt = torch.optim.SGD([p for p in default.parameters() if p.requires_grad], lr=0.1)
    default.train()
    default(torch.randint(0, cfg["vocab_size"], (1, 12))).logsumexp(-1).mean().backward()
    opt.step()
    for name, param in default.named_parameters():
        assert torch.equal(param, before[name]) != (".lora_" in name), name


def test_llama4_lora_matches_peft_on_transformers(monkeypatch):
    peft = pytest.importorskip("peft")
    import peft.tuners.lora.torchao as peft_torchao

    # peft 0.21 raises on torchao < 0.16 (we pin 0.11 for torchtune) when dispatching LoRA layers.
    monkeypatch.setattr(peft_torchao, "is_torchao_available", lambda: False)
    cfg = random_text_config("maverick", 24)
    model, _ = _lora_model(cfg, 24, lora_attn_modules=ALL_ATTN, apply_lora_to_mlp=True, apply_lora_to_output=True)
    hf = peft.get_peft_model(
        hf_reference_model(cfg, 24),
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj", "lm_head"]),
    ).eval()  # fmt: skip
    adapters = {tune_to_peft_key(k): v for k, v in get_adapter_params(model).items()}
    result = peft.set_peft_model_state_dict(hf, adapters)
    assert not result.unexpected_keys
    tokens = torch.randint(0, cfg["vocab_size"], (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max().item() <= 1e-4
