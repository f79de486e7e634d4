"""A safetensors file checked from its header alone: structure, offsets, file size, dtypes, and shapes vs the config.

The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header length N, N bytes of JSON
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``, then the data. The safetensors
library refuses a file whose tensors do not tile the data exactly (no gap, no overlap, nothing after the last one)
and whose byte ranges do not match dtype x shape; the same rules are checked here, plus what the library cannot know:
that each Llama 4 text weight has the shape the model's config gives it. Only the header is read (a ranged read on
object stores), so a truncated or mislabelled 800 GB checkpoint is refused before a byte of it is copied or trained.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # llama4tune's package imports torch, which a cached rerun's key computation must not pay for
    from llama4tune.config import Llama4TextArgs

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
_LAYER_KEY = re.compile(r"^(?:language_model\.)?model\.layers\.(\d+)\.(.+)$")
_MULTIMODAL = ("vision_model.", "multi_modal_projector.")


def read_header(handle: IO[bytes], size: int) -> tuple[dict[str, Any], int]:
    """The parsed header and the data section's size; ValueError saying what is wrong with the file's framing."""
    if size < 8:
        raise ValueError(f"{size} bytes: too short to hold a safetensors header (truncated?)")
    (length,) = struct.unpack("<Q", handle.read(8))
    if length > MAX_HEADER_BYTES or length > size - 8:
        raise ValueError(f"header length field says {length} bytes but the file has {size - 8} after it "
                         "(truncated, or not a safetensors file)")
    try:
        header = json.loads(handle.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not valid JSON ({exc}; truncated or not a safetensors file)") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, size - 8 - length


def header_problems(header: dict[str, Any], data_bytes: int, args: Llama4TextArgs | None) -> list[str]:
    """What is wrong with the tensors the header lists, given the data section's size (file size - 8 - N)."""
    problems: list[str] = []
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not (isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())):
                problems.append("__metadata__ must map strings to strings")
            continue
        problem = _entry_problem(name, entry)
        if problem:
            problems.append(problem)
            continue
        begin, end = entry["data_offsets"]
        spans.append((begin, end, name))
        if args is not None and (expected := expected_shape(name, args)) is not None:
            if entry["shape"] != expected:
                problems.append(f"tensor {name}: shape {entry['shape']} but the config gives {expected}")
            elif entry["dtype"] not in FLOAT_DTYPES:
                problems.append(f"tensor {name}: dtype {entry['dtype']} where a weight must be floating point")
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problems.append(f"tensor {name}: data starts at byte {begin} of the data section, expected {position} "
                            f"({'overlapping' if begin < position else 'a gap before it'})")
        position = max(position, end)
    if not problems and position != data_bytes:
        shortfall = position - data_bytes
        problems.append(f"the header's tensors need {position} data bytes but the file holds {data_bytes} "
                        + (f"({shortfall} missing: truncated)" if shortfall > 0 else f"({-shortfall} extra)"))
    return problems


def _entry_problem(name: str, entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"tensor {name}: header entry is not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        return f"tensor {name}: unknown dtype {dtype!r}"
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        return f"tensor {name}: shape {shape!r} is not a list of non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"tensor {name}: data_offsets {offsets!r} is not [begin, end] with begin <= end"
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        return (f"tensor {name}: {offsets[1] - offsets[0]} bytes in data_offsets but dtype {dtype} x shape {shape} "
                f"needs {expected}")
    return None


def expected_shape(name: str, args: Llama4TextArgs) -> list[int] | None:
    """The shape a Llama 4 text-decoder weight has under ``args`` (HF layout), None for other tensors."""
    if name.startswith(_MULTIMODAL):
        return None
    d, v = args.hidden_size, args.vocab_size
    key = name.removeprefix("language_model.")
    top = {"model.embed_tokens.weight": [v, d], "lm_head.weight": [v, d], "model.norm.weight": [d]}
    if key in top:
        return top[key]
    match = _LAYER_KEY.match(name)
    if match is None or int(match.group(1)) >= args.num_hidden_layers:
        return None
    layer, module = int(match.group(1)), match.group(2)
    q, kv = args.num_attention_heads * args.head_dim, args.num_key_value_heads * args.head_dim
    e = args.num_local_experts
    i = args.intermediate_size if args.is_moe_layer(layer) else args.intermediate_size_mlp
    shapes = {
        "input_layernorm.weight": [d], "post_attention_layernorm.weight": [d],
        "self_attn.q_proj.weight": [q, d], "self_attn.k_proj.weight": [kv, d], "self_attn.v_proj.weight": [kv, d],
        "self_attn.o_proj.weight": [d, q], "self_attn.q_proj.bias": [q], "self_attn.k_proj.bias": [kv],
        "self_attn.v_proj.bias": [kv], "self_attn.o_proj.bias": [d],
    }
    if args.is_moe_layer(layer):
        shapes |= {"feed_forward.router.weight": [e, d], "feed_forward.experts.gate_up_proj": [e, d, 2 * i],
                   "feed_forward.experts.down_proj": [e, i, d], "feed_forward.shared_expert.gate_proj.weight": [i, d],
                   "feed_forward.shared_expert.up_proj.weight": [i, d],
                   "feed_forward.shared_expert.down_proj.weight": [d, i]}
    else:
        shapes |= {"feed_forward.gate_proj.weight": [i, d], "feed_forward.up_proj.weight": [i, d],
                   "feed_forward.down_proj.weight": [d, i]}
    return shapes.get(module)


def file_problems(handle: IO[bytes], size: int, args: Llama4TextArgs | None) -> list[str]:
    """Everything wrong with one safetensors file, read from ``handle`` (positioned at 0) of ``size`` bytes."""
    try:
        header, data_bytes = read_header(handle, size)
    except ValueError as exc:
        return [str(exc)]
    return header_problems(header, data_bytes, args)
