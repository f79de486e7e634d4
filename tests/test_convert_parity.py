"""convert on the real tiny Llama 4: the HF checkpoint it writes computes what the trained torchtune model computed.

A "trained" model is the tiny base loaded into llama4tune and perturbed (every weight moved, LoRA B non-zero), saved
as the train stage saves it (DCP + train_meta.json); the stage's run() converts it and transformers / peft load it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from finetune.profile import load_profile
from finetune.stage import StageContext
from finetune.store import Artifact

TOKENS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 12, 88, 5, 31, 77, 2, 140, 9] * 6])  # 96 > chunk size 64
LORA = {"rank": 4, "alpha": 8.0}


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


def _trained_model(base_dir: Path, lora: bool, lora_experts: bool = False) -> torch.nn.Module:
    from llama4tune.builders import llama4_from_hf_config, lora_llama4_from_hf_config
    from llama4tune.convert import hf_to_tune

    torch.manual_seed(1)
    if lora:
        model = lora_llama4_from_hf_config(
            base_dir, lora_attn_modules=["q_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True,
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



def _save_train_artifact(model: torch.nn.Module, root: Path, method: str) -> Artifact:
    import torch.distributed.checkpoint as dcp

    final = root / "final"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(model.state_dict(), checkpoint_id=final)
    meta = {"format": "dcp", "method": method, "lora": LORA if method == "lora" else None, "step": 7}
    (final / "train_meta.json").write_text(json.dumps(meta))
    return Artifact(stage="train", key="t", path=str(root))


def _convert(base_dir: Path, train: Artifact, out: Path, overrides: list[str]) -> dict:
    from tasks.convert import run

    profile = load_profile("tiny-cpu", ["convert.dtype=fp32", *overrides])
    out.mkdir()
    ctx = StageContext(profile=profile, key="c", workdir=out,
                       inputs={"download": Artifact(stage="download", key="d", path=str(base_dir)), "train": train})
    return run(ctx)


def _tune_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).float()


def _hf_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits.float()


def _require_peft_loads_lora() -> None:
    """peft >= 0.18.1 raises on any LoRA injection when torchao < 0.16 is installed (torchtune 0.6.1 needs 0.11)."""
    import peft
    from peft.import_utils import is_torchao_available

    try:
        is_torchao_available()
    except ImportError as exc:
        pytest.skip(f"peft {peft.__version__} cannot inject LoRA beside this torchao (pin peft<0.18.1): {exc}")


def test_convert_full_run_dcp_matches_torchtune_logits(base_dir: Path, tmp_path: Path) -> None:
    model = _trained_model(base_dir, lora=False)
    train = _save_train_artifact(model, tmp_path / "train", "full")
    metrics = _convert(base_dir, train, tmp_path / "out", ["convert.max_shard_size=1MB"])
    out = tmp_path / "out"
    assert metrics["shards"] > 3 and metrics["peft_adapter"] is None
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(metrics["files"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    diff = (_hf_logits(out) - _tune_logits(model)).abs().max().item()
    assert diff <= 1e-4, diff


def test_convert_lora_run_merges_and_writes_peft_adapter_matching_torchtune(base_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _trained_model(base_dir, lora=True)
    train = _save_train_artifact(model, tmp_path / "train", "lora")
    metrics = _convert(base_dir, train, tmp_path / "out", [])
    out = tmp_path / "out"
    assert metrics["lora_modules_merged"] > 0 and metrics["peft_adapter"] == "adapter"
    expected = _tune_logits(model)
    assert (_hf_logits(out) - expected).abs().max().item() <= 1e-4

    _require_peft_loads_lora()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        peft_logits = peft_model(TOKENS).logits.float()
    assert (peft_logits - expected).abs().max().item() <= 1e-4
    # The adapter moved the model: the comparison above is not base-vs-base.
    assert (_hf_logits(base_dir) - expected).abs().max().item() > 1e-3


def test_convert_expert_lora_merges_without_peft_adapter(base_dir: Path, tmp_path: Path) -> None:
    model = _trained_model(base_dir, lora=True, lora_experts=True)
    train = _save_train_artifact(model, tmp_path / "train", "lora")
    metrics = _convert(base_dir, train, tmp_path / "out", [])
    assert metrics["peft_adapter"] is None and not (tmp_path / "out" / "adapter").exists()
    assert (_hf_logits(tmp_path / "out") - _tune_logits(model)).abs().max().item() <= 1e-4
