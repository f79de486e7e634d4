"""safetensors headers checked the way the library reads them, plus Llama 4 shapes from the config."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
from safetensors.numpy import save

from finetune.safetensors_check import expected_shape, file_problems
from llama4tune.config import load_text_args


def _problems(blob: bytes, config: dict | None = None) -> list[str]:
    return file_problems(io.BytesIO(blob), len(blob), load_text_args(config) if config else None)


def _raw(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def test_a_file_the_library_writes_passes() -> None:
    assert _problems(save({"a": np.ones((2, 3), dtype=np.float32), "b": np.zeros(4, dtype=np.int64)})) == []


def test_framing_faults_are_named() -> None:
    assert "too short" in _problems(b"\x01\x02")[0]
    assert "header length field says" in _problems(struct.pack("<Q", 10**6) + b"{}")[0]
    assert "not valid JSON" in _problems(_raw({}, b"")[:-1] + b"x")[0]


def test_offsets_dtype_and_size_faults_are_named() -> None:
    assert "unknown dtype 'F12'" in _problems(_raw({"t": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}},
                                                   b"\0\0"))[0]
    assert "needs 8" in _problems(_raw({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4))[0]
    gap = _raw({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8)
    assert "a gap before it" in _problems(gap)[0]
    extra = _raw({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 6)
    assert "(2 extra)" in _problems(extra)[0]


def test_llama4_shapes_follow_the_config() -> None:
    config = {"model_type": "llama4_text", "hidden_size": 64, "vocab_size": 100, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 32,
              "intermediate_size_mlp": 48, "num_local_experts": 4, "interleave_moe_layer_step": 2}
    args = load_text_args(config)
    assert expected_shape("model.layers.0.feed_forward.gate_proj.weight", args) == [48, 64]  # dense layer
    assert expected_shape("language_model.model.layers.1.feed_forward.experts.gate_up_proj", args) == [4, 64, 64]
    assert expected_shape("model.layers.0.self_attn.k_proj.weight", args) == [32, 64]
    assert expected_shape("vision_model.patch_embedding.linear.weight", args) is None
    wrong = save({"model.layers.0.self_attn.q_proj.weight": np.zeros((64, 32), dtype=np.float16)})
    assert _problems(wrong, config) == ["tensor model.layers.0.self_attn.q_proj.weight: shape [64, 32] but the "
                                        "config gives [64, 64]"]
    ints = save({"model.norm.weight": np.zeros(64, dtype=np.int32)})
    assert "must be floating point" in _problems(ints, config)[0]
