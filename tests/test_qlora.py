"""QLoRA's NF4 base (llama4tune/nf4.py): what is quantized and what is not, the routed experts' 2-D NF4 storage and
their one-layer-at-a-time dequantization, loading, conversion from the bf16 base, and `finetune plan` at real size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import training
from torchtune.modules.peft import get_adapter_params

from finetune.plan.errors import PlanError
from finetune.plan.planner import plan
from finetune.profile import ProfileError, load_profile
from llama4tune import llama4_from_hf_config, lora_llama4_from_hf_config
from llama4tune.convert import hf_to_tune, tune_to_hf_key
from llama4tune.lora import merge_lora_state_dict
from llama4tune.moe import GroupedExperts, LoRAGroupedExperts
from llama4tune.nf4 import NF4GroupedExperts, NF4LoRAGroupedExperts, quantization_kwargs
from llama4tune.reference import hf_reference_model, random_text_config
from tasks.convert.overlay import AdaptersOnBase
from tasks.convert.sources import SafetensorsSource
from tasks.convert.to_hf import dcp_key_of_base
from tunerecipes import nf4_weights

RANK, ALPHA = 4, 8.0
LORA = {"lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
        "lora_rank": RANK, "lora_alpha": ALPHA}


def _experts_pair(dtype: torch.dtype, lora: bool = False) -> tuple[GroupedExperts, GroupedExperts]:
    """NF4 experts and plain experts holding exactly the NF4 experts' dequantized weights (and the same adapters)."""
    torch.manual_seed(0)
    shape = {"dim": 128, "hidden_dim": 256, "num_experts": 4}
    adapters = {"rank": RANK, "alpha": ALPHA} if lora else {}
    with training.set_default_dtype(dtype):
        nf4 = (NF4LoRAGroupedExperts if lora else NF4GroupedExperts)(**shape, **adapters)
        plain = (LoRAGroupedExperts if lora else GroupedExperts)(**shape, **adapters)
    with torch.no_grad():
        plain.gate_up_proj.copy_(nf4.gate_up_proj.get_original_weight().view(4, 128, 512))
        plain.down_proj.copy_(nf4.down_proj.get_original_weight().view(4, 256, 128))
        for name in adapters and nf4.adapter_params():
            getattr(nf4, name).normal_(std=0.05)  # B starts at zero: make the adapters count
            getattr(plain, name).copy_(getattr(nf4, name))
    return nf4, plain


@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "adapters"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nf4_experts_compute_exactly_what_their_dequantized_weights_do(dtype: torch.dtype, lora: bool) -> None:
    nf4, plain = _experts_pair(dtype, lora)
    assert isinstance(nf4.gate_up_proj, NF4Tensor) and nf4.gate_up_proj.shape == (4 * 128, 512)  # [E * in, out]
    assert isinstance(nf4.down_proj, NF4Tensor) and nf4.down_proj.shape == (4 * 256, 128)
    counts = torch.tensor([3, 0, 5, 2])  # an expert without tokens too
    x = torch.randn(10, 128, dtype=dtype, requires_grad=True)
    out = nf4(x, counts)
    (out * out).sum().backward()
    grad, x.grad = x.grad, None
    ref = plain(x, counts)
    (ref * ref).sum().backward()
    assert torch.equal(out, ref) and torch.allclose(grad, x.grad, atol=1e-6)
    if lora:  # the adapters' gradients too; the NF4 base gets none
        for name in nf4.adapter_params():
            assert torch.allclose(getattr(nf4, name).grad, getattr(plain, name).grad, atol=1e-5), name
        assert not nf4.gate_up_proj.requires_grad and nf4.gate_up_proj.grad is None


def test_nf4_experts_keep_no_dequantized_weight_for_backward() -> None:
    """Autograd saves the NF4 weight, not its dequantized copy: peak memory grows by one layer's experts."""
    nf4, _ = _experts_pair(torch.float32)
    saved: list[torch.Size] = []
    x = torch.randn(10, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        nf4(x, torch.tensor([3, 0, 5, 2])).sum().backward()
    dequantized = {(4, 128, 512), (4, 256, 128), (512, 512), (1024, 128)}
    assert not {tuple(shape) for shape in saved} & dequantized, saved


def test_qlora_model_quantizes_linears_and_experts_and_keeps_router_norms_embeddings() -> None:
    cfg = random_text_config("maverick", 3)  # dense and MoE layers
    with training.set_default_dtype(torch.bfloat16), torch.device("meta"):
        model = lora_llama4_from_hf_config(cfg, **LORA, apply_lora_to_experts=True, quantize_base=True)
    state = model.state_dict(keep_vars=True)
    nf4 = {key for key, value in state.items() if isinstance(value, NF4Tensor)}
    adapters = set(get_adapter_params(model))
    assert nf4 and not nf4 & adapters
    assert all(state[key].dtype == torch.bfloat16 for key in adapters)
    plain = {key for key in state if key not in nf4 | adapters}
    assert plain and all(key.endswith(("router.weight", "norm.scale", "tok_embeddings.weight", "output.weight"))
                         for key in plain), sorted(plain)
    experts = [key for key in nf4 if key.endswith(("gate_up_proj", "down_proj"))]
    assert experts and all(state[key].dim() == 2 for key in experts)
    assert any(isinstance(m, NF4LoRAGroupedExperts) for m in model.modules())


def test_a_model_nf4_cannot_hold_is_refused_before_any_stage_naming_the_size() -> None:
    from finetune.plan.model import ModelConfig, build_model
    from finetune.plan.recipe import recipe_settings

    with pytest.raises(ValueError, match="weight of 100 elements is not a multiple of the NF4 block size 64"):
        quantization_kwargs(100)
    # tiny k_proj: 128 blocks, in 8 scaler blocks so that FSDP can split it over up to 8 processes
    assert quantization_kwargs(128 * 64) == {"block_size": 64, "scaler_block_size": 16}
    profile = load_profile("tiny-cpu", ["train.method=qlora"])
    odd = random_text_config("scout", 1, hidden_size=36, num_key_value_heads=1, num_attention_heads=2, head_dim=8)
    with pytest.raises(PlanError, match="train.method qlora: QLoRA cannot quantize .* 288 elements"):
        build_model(profile, ModelConfig(odd, "test", 0.0), recipe_settings(profile))


def test_qlora_under_fsdp_with_nf4_weights_that_cannot_split_is_refused_by_the_plan_naming_the_weight() -> None:
    """torchao splits every inner tensor of an NF4 weight evenly over the FSDP processes: the tiny model's 128-row
    q_proj cannot go to 3 processes. The plan refuses it before any stage (the trainer does the same check before
    sharding); 2 processes fit."""
    with pytest.raises(PlanError, match=r"QLoRA with FSDP over 3 processes: NF4 weight layers\.0\.attn\.q_proj\.weight: "
                                        r"128 rows, .* do not split over 3 processes"):
        plan(load_profile("tiny-cpu", ["train.method=qlora", "train.nproc_per_node=3"]))
    assert plan(load_profile("tiny-cpu", ["train.method=qlora", "train.nproc_per_node=2"]))["fits"]


def _hf_checkpoint(cfg: dict, seed: int, folder: Path) -> dict[str, torch.Tensor]:
    """A text-only HF checkpoint (fp32) of a random reference model; returns its llama4tune state dict."""
    hf_state = hf_reference_model(cfg, seed).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in hf_state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama4_text"}))
    return hf_to_tune(hf_state, cfg)


def test_nf4_base_is_loaded_one_tensor_at_a_time_as_the_recipe_does(tmp_path: Path) -> None:
    cfg = random_text_config("scout", 5)
    tune_state = _hf_checkpoint(cfg, 5, tmp_path / "base")
    with torch.device("meta"):
        model = lora_llama4_from_hf_config(cfg, **LORA, quantize_base=True)
    model.to_empty(device="cpu")
    keys = nf4_weights.nf4_keys(model)
    index = {key: (tmp_path / "base" / "model.safetensors", tune_to_hf_key(key)) for key in keys}
    nf4_weights.load(model, index, keys, torch.device("cpu"), distributed=False, cpu_offload=False)
    for key in keys:
        loaded = model.state_dict()[key]
        assert isinstance(loaded, NF4Tensor)
        # The NF4 code of the checkpoint's weight, reshaped to its 2-D storage.
        expected = tune_state[key].reshape(loaded.shape)
        assert (loaded.get_original_weight() - expected).abs().mean() < 0.1 * expected.abs().mean()


def test_convert_merges_qlora_adapters_into_the_bf16_base_not_into_nf4(tmp_path: Path) -> None:
    """The merged model equals the adapters applied on the original base weights, exactly (fp32 maths)."""
    cfg = random_text_config("scout", 7)
    base_state = _hf_checkpoint(cfg, 7, tmp_path / "base")
    model = lora_llama4_from_hf_config(cfg, **LORA).eval()
    model.load_state_dict(base_state, strict=False)
    gen = torch.Generator().manual_seed(7)
    adapters = {}
    for key, param in get_adapter_params(model).items():
        with torch.no_grad():
            param.copy_(0.05 * torch.randn(param.shape, generator=gen))
        adapters[f"model.{key}"] = param.detach().clone()
    source = AdaptersOnBase(_StubAdapters(adapters, tmp_path), SafetensorsSource(tmp_path / "base"),
                            dcp_key_of_base({**cfg, "model_type": "llama4_text"}))
    trained = source.load(sorted(source.tensors()), torch.float32)
    merged = merge_lora_state_dict({k.removeprefix("model."): v for k, v in trained.items()}, RANK, ALPHA)
    plain = llama4_from_hf_config(cfg).eval()
    plain.load_state_dict(merged, strict=True)
    tokens = torch.randint(0, cfg["vocab_size"], (2, 17), generator=gen)
    with torch.no_grad():
        assert (plain(tokens) - model(tokens)).abs().max().item() <= 1e-5


class _StubAdapters:
    """The adapter half of a QLoRA checkpoint held in memory (DcpSource's interface)."""

    def __init__(self, tensors: dict[str, torch.Tensor], location: Path) -> None:
        from tasks.convert.sources import TensorInfo

        self.location = location
        self._tensors = tensors
        self._info = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in tensors.items()}

    def tensors(self):  # noqa: ANN201
        return dict(self._info)

    def byte_ranges(self, key: str) -> None:
        return None

    def load(self, keys, dtype):  # noqa: ANN001, ANN201
        return {key: self._tensors[key].to(dtype) for key in keys}


def test_qlora_needs_dcp_checkpoints_and_a_lora_section() -> None:
    with pytest.raises(ProfileError, match="method 'qlora' saves the adapters only"):
        load_profile("tiny-cpu", ["train.method=qlora", "train.enable_dcp=false"])
    with pytest.raises(ProfileError, match="method 'qlora' needs a 'lora:' section"):
        load_profile("scout-sft", ["train.method=qlora"])
    assert load_profile("tiny-cpu", ["train.method=qlora"]).train.lora is not None  # works as typed


@pytest.mark.slow  # plans full-size Scout with NF4 weights on the meta device (~30 s)
def test_scout_qlora_fits_one_h100_with_five_percent_headroom() -> None:
    result = plan(load_profile("scout-qlora"))
    assert (result["gpu"], result["world_size"]) == ("H100-80GB", 1)
    assert result["fits"], result
    assert result["per_gpu_peak_gib"] <= 0.95 * result["gpu_memory_gib"]
    # Dequantizing ~105B NF4 weights three times per micro-batch (forward, recompute, backward) takes HBM time.
    assert result["estimate"]["nf4_dequantize_s_per_step"] > 0.5 * result["estimate"]["compute_s_per_step"]
    # NF4 is 4 bits per weight plus its scales: about a quarter of bf16's bytes for the quantized weights.
    assert result["params_gib_per_gpu"] < 0.3 * result["total_params"] * 2 / 2**30


def test_four_bit_evaluation_quantizes_the_base_once_and_gates_like_with_like() -> None:
    from flows.pipeline import GATE_BASE, GATE_TUNED, stage_keys, steps_until

    profile = load_profile("tiny-cpu", ["train.method=qlora", "evaluate.weights=w4a16"])
    steps = {step.label: step for step in steps_until("benchmark", profile)}
    assert steps["quantize-base"].inputs == {"convert": "download", "pack": "pack"}
    assert steps[GATE_BASE].inputs == {"model": "quantize-base"} and steps[GATE_TUNED].inputs == {"model": "quantize"}
    assert "evaluate-quantized" not in steps and steps["benchmark-w4a16"].after_gate
    keys = stage_keys(profile, steps.values())
    other = stage_keys(load_profile("tiny-cpu", ["train.method=qlora", "evaluate.weights=w4a16", "train.lr=1e-3"]),
                       steps.values())
    # The base's 4-bit artifact and its scores do not depend on training: computed once, then cache hits.
    assert keys["quantize-base"] == other["quantize-base"] and keys[GATE_BASE] == other[GATE_BASE]
    assert keys["quantize"] != other["quantize"]
    assert [s.label for s in steps_until("benchmark", load_profile("tiny-cpu"))].count("quantize-base") == 0


def test_nf4_experts_dequantize_one_expert_at_a_time_within_the_stated_bytes() -> None:
    """Measured from the allocator's events: an experts weight dequantizes bit-exactly into its bf16 copy plus one
    expert's indices and the scales (llama4tune/nf4.py's figures, which the plan uses), where torchao allocates
    ~14 bytes per weight of the whole tensor; to_nf4 at load as nf4.quantize_bytes says."""
    from finetune.plan.allocator import peak_bytes
    from llama4tune import nf4

    experts = 16
    torch.manual_seed(0)
    full = torch.randn(experts * 256, 1024, dtype=torch.bfloat16)  # 4.2M weights
    weight, quantizing = peak_bytes(lambda: nf4.quantize(full))
    n = weight.numel()
    ours, peak = peak_bytes(lambda: nf4._experts(weight, experts, torch.bfloat16))
    theirs, torchao_peak = peak_bytes(lambda: weight.get_original_weight())
    assert torch.equal(ours.reshape(n // 1024, 1024), theirs)
    assert 2 * n < peak <= nf4.expert_dequantize_bytes(n, experts) * 1.01
    assert torchao_peak / n == pytest.approx(nf4.TORCHAO_DEQUANTIZE_BYTES_PER_WEIGHT, rel=0.05)
    assert quantizing == pytest.approx(nf4.quantize_bytes(n), rel=0.05)


def test_nf4_experts_whose_experts_do_not_start_on_a_block_are_refused() -> None:
    with pytest.raises(ValueError, match="one expert's gate_up_proj has 96 weights, not a multiple of the NF4 block"):
        NF4GroupedExperts(dim=4, hidden_dim=12, num_experts=16)
