"""convert on the real tiny Llama 4: the HF checkpoint it writes computes what the trained torchtune model computed.

A "trained" model is the tiny base loaded into llama4tune and perturbed (every weight moved, or LoRA A/B moved),
saved as tunerecipes/sft.py saves its final checkpoint (DCP of {"model": state_dict}, or llama4tune's HF checkpointer
with LoRA merged) plus train_meta.json; the stage's run() converts it and transformers / peft load the result.
"""

from __future__ import annotations

import functools
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.profile import load_profile
from finetune.stage import PermanentError, StageContext
from finetune.store import Artifact

TOKENS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 12, 88, 5, 31, 77, 2, 140, 9] * 6])  # 96 > chunk size 64
LORA = {"rank": 4, "alpha": 8.0, "attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_to_mlp": True}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedded.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("base") / "tiny")


def _hf_weights(base_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(base_dir.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def trained_model(base_dir: Path, lora: bool, lora_experts: bool = False) -> torch.nn.Module:
    from llama4tune.builders import llama4_from_hf_config, lora_llama4_from_hf_config
    from llama4tune.convert import hf_to_tune

    torch.manual_seed(1)
    if lora:
        model = lora_llama4_from_hf_config(
            base_dir, lora_attn_modules=LORA["attn_modules"], apply_lora_to_mlp=LORA["apply_to_mlp"],
            apply_lora_to_experts=lora_experts, lora_rank=LORA["rank"], lora_alpha=LORA["alpha"])
    else:
        model = llama4_from_hf_config(base_dir)
    missing, unexpected = model.load_state_dict(hf_to_tune(_hf_weights(base_dir), base_dir), strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # LoRA runs train adapters only; full runs move every weight.
            if lora == ("lora_" in name):
                param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def _meta(method: str, fmt: str) -> dict[str, Any]:
    return {"format": fmt, "method": method, "lora": LORA if method == "lora" else None, "step": 7}


def save_dcp_final(model: torch.nn.Module, root: Path, method: str) -> Artifact:
    import torch.distributed.checkpoint as dcp

    final = root / "final"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict()}, checkpoint_id=final)  # as tunerecipes/sft.py saves its final
    (final / "train_meta.json").write_text(json.dumps(_meta(method, "dcp")))
    return Artifact(stage="train", key="t", path=str(root))


def _save_hf_final(model: torch.nn.Module, base_dir: Path, root: Path, method: str) -> Artifact:
    from torchtune import training
    from torchtune.modules.peft import get_adapter_state_dict

    from llama4tune.checkpointer import Llama4HFCheckpointer
    from llama4tune.lora import merge_lora_state_dict

    full = model.state_dict()
    state: dict[str, Any] = {training.MODEL_KEY: full}
    if method == "lora":
        state = {training.MODEL_KEY: merge_lora_state_dict(full, LORA["rank"], LORA["alpha"]),
                 training.ADAPTER_KEY: get_adapter_state_dict(full),
                 training.ADAPTER_CONFIG: {"r": LORA["rank"], "lora_alpha": LORA["alpha"],
                                           "target_modules": ["q_proj", "v_proj", "output_proj", "w1", "w2", "w3"]}}
    Llama4HFCheckpointer(base_dir, output_dir=root / "staging").save_checkpoint(state, epoch=0)
    (root / "staging" / "epoch_0").rename(root / "final")
    (root / "final" / "train_meta.json").write_text(json.dumps(_meta(method, "hf")))
    return Artifact(stage="train", key="t", path=str(root))


def convert(base_dir: Path, train: Artifact, out: Path, overrides: list[str] = ()) -> dict[str, Any]:
    from tasks.convert import run

    profile = load_profile("tiny-cpu", ["convert.dtype=fp32", *overrides])
    out.mkdir()
    ctx = StageContext(profile=profile, key="c", workdir=out,
                       inputs={"download": Artifact(stage="download", key="d", path=str(base_dir)), "train": train})
    return run(ctx)


def tune_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).float()


def hf_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits.float()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def lora_run(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, dict]:
    root = tmp_path_factory.mktemp("lora")
    model = trained_model(base_dir, lora=True)
    metrics = convert(base_dir, save_dcp_final(model, root / "train", "lora"), root / "out")
    return model, root / "out", metrics


def test_convert_full_run_dcp_matches_torchtune_logits(base_dir: Path, tmp_path: Path) -> None:
    model = trained_model(base_dir, lora=False)
    metrics = convert(base_dir, save_dcp_final(model, tmp_path / "train", "full"), tmp_path / "out",
                      ["convert.max_shard_size=1MB"])
    out = tmp_path / "out"
    assert metrics["shards"] > 3 and metrics["peft_adapter"] is None
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(metrics["files"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert _max_diff(hf_logits(out), tune_logits(model)) <= 1e-4


def test_convert_full_run_hf_format_matches_torchtune_logits(base_dir: Path, tmp_path: Path) -> None:
    model = trained_model(base_dir, lora=False)
    convert(base_dir, _save_hf_final(model, base_dir, tmp_path / "train", "full"), tmp_path / "out")
    assert _max_diff(hf_logits(tmp_path / "out"), tune_logits(model)) <= 1e-4


def test_convert_lora_run_merged_model_matches_adapter_applied_model(
        lora_run: tuple[torch.nn.Module, Path, dict], base_dir: Path) -> None:
    model, out, metrics = lora_run
    assert metrics["lora_modules_merged"] == 4 * 6  # per layer: q, v, output_proj, shared expert w1, w2, w3
    expected = tune_logits(model)
    assert _max_diff(hf_logits(out), expected) <= 1e-4
    # The adapters moved the model: the comparison above is not base-vs-base.
    assert _max_diff(hf_logits(base_dir), expected) > 1e-3


def _require_peft_loads_lora() -> None:
    """peft >= 0.18.1 raises on any LoRA injection when torchao < 0.16 is installed (torchtune 0.6.1 needs 0.11)."""
    import peft
    from peft.import_utils import is_torchao_available

    try:
        is_torchao_available()
    except ImportError as exc:
        pytest.skip(f"peft {peft.__version__} cannot inject LoRA beside this torchao (pin peft<0.18.1): {exc}")


def _peft_logits(base_dir: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _require_peft_loads_lora()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter).eval()(TOKENS).logits.float()


def test_convert_lora_peft_adapter_on_base_matches_adapter_applied_model(
        lora_run: tuple[torch.nn.Module, Path, dict], base_dir: Path) -> None:
    model, out, metrics = lora_run
    assert metrics["peft_adapter"] == "adapter"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == LORA["rank"] and config["lora_alpha"] == LORA["alpha"]
    assert _max_diff(_peft_logits(base_dir, out / "adapter"), tune_logits(model)) <= 1e-4


def test_convert_lora_hf_format_keeps_merged_weights_and_carries_adapter(base_dir: Path, tmp_path: Path) -> None:
    model = trained_model(base_dir, lora=True)
    metrics = convert(base_dir, _save_hf_final(model, base_dir, tmp_path / "train", "lora"), tmp_path / "out")
    out = tmp_path / "out"
    assert metrics["lora_modules_merged"] == 0 and metrics["peft_adapter"] == "adapter"
    expected = tune_logits(model)
    assert _max_diff(hf_logits(out), expected) <= 1e-4
    assert _max_diff(_peft_logits(base_dir, out / "adapter"), expected) <= 1e-4


def test_convert_expert_lora_merges_and_refuses_a_peft_adapter_it_cannot_express(base_dir: Path, tmp_path: Path) -> None:
    model = trained_model(base_dir, lora=True, lora_experts=True)
    train = save_dcp_final(model, tmp_path / "train", "lora")
    with pytest.raises(PermanentError, match=r"no PEFT LoRA form.*set convert.keep_peft_adapter: false"):
        convert(base_dir, train, tmp_path / "refused")  # profiles refuse this pair up front; a checkpoint still can
    metrics = convert(base_dir, train, tmp_path / "out", ["convert.keep_peft_adapter=false"])
    assert metrics["peft_adapter"] is None and not (tmp_path / "out" / "adapter").exists()
    assert _max_diff(hf_logits(tmp_path / "out"), tune_logits(model)) <= 1e-4


@pytest.mark.parametrize("fmt", ["dcp", "hf"])
def test_both_final_formats_export_the_same_peft_adapter(base_dir: Path, tmp_path: Path, fmt: str) -> None:
    """One exporter (llama4tune/peft.py): exact module names in target_modules whichever format training saved."""
    model = trained_model(base_dir, lora=True)
    save = save_dcp_final if fmt == "dcp" else functools.partial(_save_hf_final, base_dir=base_dir)
    convert(base_dir, save(model, root=tmp_path / "train", method="lora"), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] and all(name.startswith("model.layers.") for name in config["target_modules"])
    assert "model.layers.0.self_attn.q_proj" in config["target_modules"]
    assert (config["r"], config["lora_alpha"]) == (LORA["rank"], LORA["alpha"])


@pytest.fixture(scope="module")
def mm_base(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama4ForConditionalGeneration, saved as the hub's are (``language_model.*``, ``vision_model.*``,
    ``multi_modal_projector.*``, sharded with an index), whose language model is the tiny text base."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4VisionConfig

    from embedded.tiny_model import TINY_TEXT_CONFIG

    out = tmp_path_factory.mktemp("mm") / "base"
    vision = Llama4VisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                image_size=56, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                                projector_output_dim=TINY_TEXT_CONFIG["hidden_size"])
    config = Llama4Config(text_config=TINY_TEXT_CONFIG, vision_config=vision.to_dict())
    config.architectures = ["Llama4ForConditionalGeneration"]
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(config)
    text = {f"language_model.{k}": v for k, v in _hf_weights(base_dir).items()}
    assert not model.load_state_dict(text, strict=False).unexpected_keys
    model.save_pretrained(out, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(base_dir / name, out / name)
    return out


def _mm_logits(path: Path, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    from transformers import Llama4ForConditionalGeneration

    model = Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def test_multimodal_base_text_weights_load_through_the_checkpointer_and_train(mm_base: Path, tmp_path: Path) -> None:
    from llama4tune.builders import llama4_from_hf_config, lora_llama4_from_hf_config
    from llama4tune.checkpointer import Llama4HFCheckpointer

    assert len(list(mm_base.glob("model-*.safetensors"))) > 1
    state = Llama4HFCheckpointer(mm_base, output_dir=tmp_path / "out").load_checkpoint()["model"]
    model = llama4_from_hf_config(mm_base).eval()
    model.load_state_dict(state, strict=True)  # every text weight, nothing of the vision tower
    assert _max_diff(tune_logits(model), _mm_logits(mm_base)) <= 1e-4

    # A few LoRA steps on the text model: the loss falls, only adapters move.
    torch.manual_seed(0)
    lora = lora_llama4_from_hf_config(mm_base, lora_attn_modules=LORA["attn_modules"], lora_rank=LORA["rank"],
                                      lora_alpha=LORA["alpha"])
    missing, unexpected = lora.load_state_dict(state, strict=False)
    assert not unexpected and missing and all("lora_" in k for k in missing)
    trainable = [p for n, p in lora.named_parameters() if "lora_" in n]
    for name, param in lora.named_parameters():
        param.requires_grad_("lora_" in name)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        logits = lora(TOKENS[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), TOKENS[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(lora.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("fmt,method", [("dcp", "full"), ("dcp", "lora"), ("hf", "lora")])
def test_convert_multimodal_base_keeps_vision_weights_and_matches_text_logits(
        mm_base: Path, tmp_path: Path, fmt: str, method: str) -> None:
    from safetensors.torch import load_file

    model = trained_model(mm_base, lora=method == "lora")
    save = save_dcp_final if fmt == "dcp" else functools.partial(_save_hf_final, base_dir=mm_base)
    metrics = convert(mm_base, save(model, root=tmp_path / "train", method=method), tmp_path / "out")
    base, converted = _hf_weights(mm_base), {}
    for shard in sorted((tmp_path / "out").glob("model-*.safetensors")):
        converted.update(load_file(shard))
    assert set(converted) == set(base)  # text weights under language_model., nothing dropped or added
    carried = [k for k in base if k.startswith(("vision_model.", "multi_modal_projector."))]
    assert carried and metrics["carried_base_tensors"] == len(carried)
    for key in carried:  # byte for byte, NaN-safe
        assert converted[key].dtype == base[key].dtype
        assert torch.equal(converted[key].view(torch.uint8), base[key].view(torch.uint8)), key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vision_config"] == json.loads((mm_base / "config.json").read_text())["vision_config"]
    expected = tune_logits(model)
    assert _max_diff(_mm_logits(tmp_path / "out"), expected) <= 1e-4
    assert _max_diff(_mm_logits(mm_base), expected) > 1e-3  # training moved the text model
    if method == "lora":
        adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
        assert adapter and all(k.startswith("base_model.model.language_model.model.layers.") for k in adapter)


@pytest.mark.parametrize("fmt", ["dcp", "hf"])
def test_convert_multimodal_lora_peft_adapter_adapts_only_the_language_model(
        mm_base: Path, tmp_path: Path, fmt: str) -> None:
    from peft import PeftModel
    from transformers import Llama4ForConditionalGeneration

    _require_peft_loads_lora()
    model = trained_model(mm_base, lora=True)
    save = save_dcp_final if fmt == "dcp" else functools.partial(_save_hf_final, base_dir=mm_base)
    convert(mm_base, save(model, root=tmp_path / "train", method="lora"), tmp_path / "out")
    base = Llama4ForConditionalGeneration.from_pretrained(mm_base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    adapted = [name for name, _ in peft.named_modules() if name.endswith(".lora_A")]
    assert adapted and all(".language_model." in name for name in adapted), adapted
    with torch.no_grad():
        assert _max_diff(peft(input_ids=TOKENS).logits.float(), tune_logits(model)) <= 1e-4


# -- bad input through the stage --------------------------------------------------------------------------------

def test_convert_stage_refuses_config_that_does_not_match_the_checkpoint(base_dir: Path, tmp_path: Path) -> None:
    model = trained_model(base_dir, lora=False)
    train = save_dcp_final(model, tmp_path / "train", "full")
    other = tmp_path / "base"
    shutil.copytree(base_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["intermediate_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(PermanentError, match=r"model.layers.0.mlp.experts.gate_up_proj.*config.json implies"):
        convert(other, train, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_convert_stage_names_missing_train_meta_and_missing_dcp_metadata(base_dir: Path, tmp_path: Path) -> None:
    train = save_dcp_final(trained_model(base_dir, lora=False), tmp_path / "train", "full")
    final = Path(train.path) / "final"
    (final / ".metadata").unlink()
    with pytest.raises(PermanentError, match=r"final: no \.metadata file"):
        convert(base_dir, train, tmp_path / "out1")
    (final / "train_meta.json").unlink()
    with pytest.raises(PermanentError, match=r"train_meta.json: missing"):
        convert(base_dir, train, tmp_path / "out2")


def test_convert_stage_refuses_lora_meta_without_adapters(base_dir: Path, tmp_path: Path) -> None:
    train = save_dcp_final(trained_model(base_dir, lora=False), tmp_path / "train", "full")
    (Path(train.path) / "final" / "train_meta.json").write_text(json.dumps(_meta("lora", "dcp")))
    with pytest.raises(PermanentError, match=r"says method 'lora' but the checkpoint has neither LoRA tensors"):
        convert(base_dir, train, tmp_path / "out")
