"""convert's generic machinery on synthetic state dicts: readers, shard plan, writer, LoRA merge, bad input."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.stage import PermanentError
from tasks.convert.checkpoint import convert_checkpoint
from tasks.convert.lora import LoraSpec
from tasks.convert.shards import PlannedTensor, parse_size, plan_shards
from tasks.convert.sources import DcpSource, SafetensorsSource, open_source, read_dcp_metadata


def _state(seed: int = 0, layers: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layers.{i}.proj.weight": torch.randn(48, 32, generator=g) for i in range(layers)}
    sd["norm.scale"] = torch.randn(32, generator=g)
    return sd


def _save_dcp(state: dict[str, torch.Tensor], path: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=path)
    return path


def _read_output(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        part = load_file(out / name)
        assert all(index["weight_map"][k] == name for k in part)
        tensors.update(part)
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors


def _hf(key: str) -> str:
    return "model." + key


def test_parse_size_uses_decimal_units() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.5MB") == 1_500_000 and parse_size("100 B") == 100
    with pytest.raises(ValueError, match="5GB"):
        parse_size("5 GiB")


def test_plan_shards_respects_limit_and_isolates_oversized_tensors() -> None:
    tensors = [PlannedTensor(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5, 5])]
    shards = plan_shards(tensors, max_shard_bytes=80)
    assert [[t.name for t in s.tensors] for s in shards] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert all(s.nbytes <= 80 or len(s.tensors) == 1 for s in shards)
    assert shards[0].file == "model-00001-of-00003.safetensors"


def test_convert_dcp_maps_keys_casts_dtype_and_shards(tmp_path: Path) -> None:
    state = _state()
    source = DcpSource(_save_dcp(state, tmp_path / "ckpt"))
    result = convert_checkpoint(source, tmp_path / "out", key_map=_hf, dtype=torch.bfloat16,
                                max_shard_bytes=2 * 48 * 32 * 2)
    assert len(result.shards) == 4 and all(s.nbytes <= 2 * 48 * 32 * 2 for s in result.shards)
    out = _read_output(tmp_path / "out")
    assert set(out) == {_hf(k) for k in state}
    for key, tensor in state.items():
        assert out[_hf(key)].dtype == torch.bfloat16
        assert torch.equal(out[_hf(key)], tensor.to(torch.bfloat16))
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_convert_safetensors_source_keeps_fp32_bit_exact_and_drops_mapped_out_keys(tmp_path: Path) -> None:
    state = _state()
    src = tmp_path / "hf"
    src.mkdir()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:3]}, src / "a.safetensors")
    save_file({k: state[k] for k in keys[3:]}, src / "b.safetensors")
    result = convert_checkpoint(open_source(src), tmp_path / "out", dtype=torch.float32, max_shard_bytes=10**6,
                                key_map=lambda k: None if k == "norm.scale" else _hf(k))
    out = _read_output(tmp_path / "out")
    assert len(result.shards) == 1 and _hf("norm.scale") not in out
    assert all(torch.equal(out[_hf(k)], state[k]) for k in keys if k != "norm.scale")


def test_convert_merges_linear_and_expert_lora_from_only_their_tensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    state = {
        "q.weight": torch.randn(16, 8, generator=g),
        "q.lora_a.weight": torch.randn(2, 8, generator=g),
        "q.lora_b.weight": torch.randn(16, 2, generator=g),
        "experts.gate_up_proj": torch.randn(3, 8, 10, generator=g),
        "experts.lora_gate_up_a": torch.randn(3, 8, 2, generator=g),
        "experts.lora_gate_up_b": torch.randn(3, 2, 10, generator=g),
        "other.weight": torch.randn(4, 4, generator=g),
    }
    spec = LoraSpec(rank=2, alpha=6.0)
    result = convert_checkpoint(DcpSource(_save_dcp(state, tmp_path / "ckpt")), tmp_path / "out", key_map=_hf,
                                dtype=torch.float32, max_shard_bytes=10**6, lora=spec)
    out = _read_output(tmp_path / "out")
    assert set(out) == {_hf("q.weight"), _hf("experts.gate_up_proj"), _hf("other.weight")}
    assert set(result.lora_modules) == {"q.weight", "experts.gate_up_proj"}
    want_q = state["q.weight"] + 3.0 * state["q.lora_b.weight"] @ state["q.lora_a.weight"]
    want_e = state["experts.gate_up_proj"] + 3.0 * torch.bmm(state["experts.lora_gate_up_a"],
                                                             state["experts.lora_gate_up_b"])
    torch.testing.assert_close(out[_hf("q.weight")], want_q)
    torch.testing.assert_close(out[_hf("experts.gate_up_proj")], want_e)
    assert torch.equal(out[_hf("other.weight")], state["other.weight"])


def test_convert_refuses_lora_rank_that_disagrees_with_training_metadata(tmp_path: Path) -> None:
    state = {"q.weight": torch.zeros(4, 4), "q.lora_a.weight": torch.zeros(2, 4), "q.lora_b.weight": torch.zeros(4, 2)}
    source = DcpSource(_save_dcp(state, tmp_path / "ckpt"))
    with pytest.raises(PermanentError, match=r"'q.lora_a.weight' has rank 2 .* lora rank 8"):
        convert_checkpoint(source, tmp_path / "out", key_map=_hf, dtype=torch.float32, max_shard_bytes=10**6,
                           lora=LoraSpec(rank=8, alpha=16))


def test_convert_refuses_unpaired_adapter_tensor(tmp_path: Path) -> None:
    state = {"q.weight": torch.zeros(4, 4), "q.lora_a.weight": torch.zeros(2, 4)}
    source = DcpSource(_save_dcp(state, tmp_path / "ckpt"))
    with pytest.raises(PermanentError, match=r"'q.lora_a.weight' has no partner .*q.lora_b.weight"):
        convert_checkpoint(source, tmp_path / "out", key_map=_hf, dtype=torch.float32, max_shard_bytes=10**6,
                           lora=LoraSpec(rank=2, alpha=4))


def test_convert_checks_shapes_against_config_layout_before_writing(tmp_path: Path) -> None:
    state = _state()
    expected = {_hf(k): tuple(v.shape) for k, v in state.items()}
    expected[_hf("layers.2.proj.weight")] = (48, 64)
    source = DcpSource(_save_dcp(state, tmp_path / "ckpt"))
    with pytest.raises(PermanentError, match=r"'layers.2.proj.weight' .* shape \[48, 32\] but config.json implies "
                                             r"\[48, 64\]"):
        convert_checkpoint(source, tmp_path / "out", key_map=_hf, dtype=torch.float32, max_shard_bytes=10**6,
                           expected=expected)
    assert not (tmp_path / "out").exists()


def test_convert_reports_weights_the_config_needs_but_the_checkpoint_lacks(tmp_path: Path) -> None:
    state = _state()
    expected = {_hf(k): tuple(v.shape) for k, v in state.items()} | {"lm_head.weight": (10, 32)}
    source = DcpSource(_save_dcp(state, tmp_path / "ckpt"))
    with pytest.raises(PermanentError, match=r"lacks 1 weight.*lm_head.weight"):
        convert_checkpoint(source, tmp_path / "out", key_map=_hf, dtype=torch.float32, max_shard_bytes=10**6,
                           expected=expected)


def test_convert_refuses_non_float_weight_naming_it(tmp_path: Path) -> None:
    state = _state() | {"layers.0.bad.weight": torch.ones(4, 4, dtype=torch.int32)}
    source = DcpSource(_save_dcp(state, tmp_path / "ckpt"))
    with pytest.raises(PermanentError, match=r"'layers.0.bad.weight' has dtype int32"):
        convert_checkpoint(source, tmp_path / "out", key_map=_hf, dtype=torch.bfloat16, max_shard_bytes=10**6)


def test_dcp_without_metadata_is_an_incomplete_checkpoint(tmp_path: Path) -> None:
    ckpt = _save_dcp(_state(), tmp_path / "ckpt")
    (ckpt / ".metadata").unlink()
    with pytest.raises(PermanentError, match=r"no \.metadata file"):
        DcpSource(ckpt)


def test_dcp_missing_or_truncated_data_file_is_named(tmp_path: Path) -> None:
    ckpt = _save_dcp(_state(), tmp_path / "ckpt")
    data = next(ckpt.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(PermanentError, match=rf"{data.name}: DCP data file is truncated"):
        DcpSource(ckpt)
    data.unlink()
    with pytest.raises(PermanentError, match=rf"{data.name}: DCP data file listed in \.metadata is missing"):
        DcpSource(ckpt)


class _Exploit:
    def __reduce__(self) -> tuple:
        return (print, ("pwned",))


def test_dcp_metadata_unpickler_refuses_foreign_globals(tmp_path: Path) -> None:
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(PermanentError, match=r"builtins.print is not allowed"):
        read_dcp_metadata(tmp_path)


def test_safetensors_index_naming_a_missing_shard_fails_with_its_name(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(PermanentError, match=r"model-00002-of-00002.safetensors: shard listed in .* is missing"):
        SafetensorsSource(tmp_path)


def test_safetensors_shard_lacking_an_indexed_tensor_fails(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2)}, tmp_path / "s.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s.safetensors",
                                                                                      "b": "s.safetensors"}}))
    with pytest.raises(PermanentError, match=r"s.safetensors: lacks tensor\(s\) \['b'\]"):
        SafetensorsSource(tmp_path)


def test_truncated_safetensors_shard_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(1000)}, tmp_path / "s.safetensors")
    blob = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "s.safetensors").write_bytes(blob[:-100])
    with pytest.raises(PermanentError, match=r"s.safetensors: not a readable safetensors file"):
        SafetensorsSource(tmp_path)
