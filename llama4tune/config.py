"""Llama 4 text-model hyper-parameters read from a Hugging Face config.

`Llama4TextArgs` mirrors the fields of transformers' `Llama4TextConfig` that change the maths of
the text decoder, and derives the per-layer lists (`no_rope_layers`, `moe_layers`) exactly as
transformers 5.17 does, so our builders and HF agree layer by layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Rope types whose inverse frequencies we compute (see rope.py); others are refused by name.
SUPPORTED_ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class Llama4TextArgs:
    """Text-decoder hyper-parameters, named as in HF `Llama4TextConfig` (same defaults)."""

    vocab_size: int = 202048
    hidden_size: int = 5120
    intermediate_size: int = 8192
    intermediate_size_mlp: int = 16384
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 1
    num_local_experts: int = 16
    moe_layers: tuple[int, ...] = ()
    use_qk_norm: bool = True
    rope_theta: float = 500000.0
    # None, or the llama3 scaling dict {"rope_type": "llama3", factor, low/high_freq_factor, original_max_...}.
    rope_scaling: Mapping[str, Any] | None = None
    # 1 = RoPE layer (chunked local attention), 0 = NoPE layer (global attention); HF's convention.
    no_rope_layers: tuple[int, ...] = ()
    attention_chunk_size: int | None = 8192
    # Per layer "chunked_attention" (local, chunk mask) or "full_attention"; HF derives it from
    # no_rope_layers (RoPE layers are chunked) unless the config lists it.
    layer_types: tuple[str, ...] = ()
    attn_temperature_tuning: bool = True
    floor_scale: float = 8192
    attn_scale: float = 0.1
    attention_bias: bool = False

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx in self.moe_layers

    def uses_rope(self, layer_idx: int) -> bool:
        return bool(self.no_rope_layers[layer_idx])

    def chunk_size(self, layer_idx: int) -> int | None:
        """Local attention chunk of this layer, None for global attention."""
        return self.attention_chunk_size if self.layer_types[layer_idx] == "chunked_attention" else None


_INT_FIELDS = {f.name for f in dataclasses.fields(Llama4TextArgs) if f.type in ("int", int)}
_BOOL_FIELDS = {f.name for f in dataclasses.fields(Llama4TextArgs) if f.type in ("bool", bool)}


@dataclasses.dataclass(frozen=True)
class ConfigChange:
    """One value of a published config.json rewritten so that a library we call reads it."""

    field: str
    """Dotted path in config.json, e.g. ``text_config.attn_temperature_tuning``."""
    published: Any
    normalized: Any
    needed_by: str
    """The library call that rejects or misreads the published value."""


def _scalar_type(declared: Any) -> type | None:
    """bool/int/float when a transformers config field is declared as exactly that (optionally None)."""
    options = set(typing.get_args(declared)) - {type(None)} if typing.get_args(declared) else {declared}
    return next(iter(options)) if len(options) == 1 and next(iter(options)) in (bool, int, float) else None


_KEEP = object()


def _coerced(value: Any, declared: type) -> Any:
    """The value in the declared scalar type when that conversion keeps its meaning, else ``_KEEP``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _KEEP
    if declared is bool and isinstance(value, int):
        return bool(value)  # an int flag: transformers 4.51 wrote attn_temperature_tuning as 4 and tested truthiness
    if declared is float and isinstance(value, int):
        return float(value)
    if declared is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return _KEEP



def normalize_hf_config(raw: Mapping[str, Any]) -> tuple[dict[str, Any], list[ConfigChange]]:
    """The config as transformers reads it, and each value that had to change.

    Hub Llama 4 configs were written by transformers 4.51; the pinned transformers checks every field strictly
    against its declared type (``StrictDataclassFieldValidationError``), which rejects e.g. the published
    ``attn_temperature_tuning: 4`` (declared bool) or a float field written as ``0``. Only such scalar type mismatches
    are rewritten, into the declared type with the same meaning. Everything else stays as published, on purpose:
    transformers reads ``torch_dtype`` as ``dtype`` and ``rope_theta`` + ``rope_scaling`` (Scout's llama3 scaling) as
    ``rope_parameters`` with the same values, ignores extra keys (``for_llm_compressor``) and resets
    ``cache_implementation: hybrid`` itself in ``generate``; vLLM, lm-eval and llm-compressor read configs through
    transformers, so one normalized config.json serves them all.
    """
    import transformers
    from transformers import CONFIG_MAPPING

    normalized = json.loads(json.dumps(raw))  # a deep copy with JSON types only
    changes: list[ConfigChange] = []
    default_type = "llama4" if isinstance(normalized.get("text_config"), Mapping) else "llama4_text"
    model_type = normalized.get("model_type", default_type)
    if model_type not in CONFIG_MAPPING:
        return normalized, changes  # not a model transformers knows: validation names it
    call = f"transformers {transformers.__version__} AutoConfig.from_pretrained"

    def visit(section: dict[str, Any], cls: type, prefix: str) -> None:
        try:
            hints = typing.get_type_hints(cls)
        except (NameError, TypeError):
            hints = {f.name: f.type for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        for name, value in list(section.items()):
            sub_cls = getattr(cls, "sub_configs", {}).get(name)
            if sub_cls is not None and isinstance(value, dict):
                visit(value, sub_cls, f"{prefix}{name}.")
                continue
            declared = _scalar_type(hints.get(name))
            fixed = _coerced(value, declared) if declared is not None else _KEEP
            if fixed is not _KEEP:
                section[name] = fixed
                changes.append(ConfigChange(
                    f"{prefix}{name}", value, fixed,
                    f"{call}: {cls.__name__}.{name} is declared {declared.__name__} and strict validation "
                    f"rejects a {type(value).__name__}"))

    visit(normalized, CONFIG_MAPPING[model_type], "")
    return normalized, changes


def _read_mapping(config: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(config, Mapping):
        return dict(config), "<dict>"
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"Llama 4 config not found: {path}")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc


def text_config_dict(config: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Returns (text config dict, is_multimodal) from a text or a multimodal (text_config) config."""
    raw, source = _read_mapping(config)
    if "text_config" in raw:
        text = raw["text_config"]
        if not isinstance(text, Mapping):
            raise ValueError(f"{source}: field 'text_config' must be an object, got {type(text).__name__}")
        text = dict(text)
        # The multimodal config carries tie_word_embeddings at the top level.
        text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        return text, True
    return raw, False


def _rope_from_hf(cfg: Mapping[str, Any], source: str) -> tuple[float, Mapping[str, Any] | None]:
    """Reads both the transformers-5 `rope_parameters` and the older `rope_theta` + `rope_scaling` forms."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{source}: field 'rope_parameters'/'rope_scaling' must be an object or null")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", Llama4TextArgs.rope_theta)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
    if rope_type == "default":
        return theta, None
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in params]
    if missing:
        raise ValueError(f"{source}: llama3 rope scaling is missing field(s) {missing}")
    scaling = {"rope_type": "llama3", **{k: params[k] for k in LLAMA3_ROPE_KEYS}}
    return theta, scaling


def load_text_args(config: str | Path | Mapping[str, Any] | Llama4TextArgs) -> Llama4TextArgs:
    """Builds `Llama4TextArgs` from an HF config.json path/dir, a config dict, or returns args unchanged."""
    if isinstance(config, Llama4TextArgs):
        return config
    raw, source = _read_mapping(config)
    # The same normalization the download stage applies for every other library (no second set of casts here).
    cfg, _ = text_config_dict(normalize_hf_config(raw)[0])
    model_type = cfg.get("model_type", "llama4_text")
    if model_type not in ("llama4_text", "llama4"):
        raise ValueError(f"{source}: model_type {model_type!r} is not a Llama 4 text config")
    defaults = Llama4TextArgs()
    known = {f.name for f in dataclasses.fields(Llama4TextArgs)}
    values: dict[str, Any] = {}
    for name in known - {"moe_layers", "no_rope_layers", "layer_types", "rope_theta", "rope_scaling"}:
        value = cfg.get(name)
        # An explicit null attention_chunk_size means "no chunking"; other nulls mean "HF default".
        keep_null = name == "attention_chunk_size" and name in cfg
        values[name] = value if value is not None or keep_null else getattr(defaults, name)
    if values["hidden_act"] != "silu":
        raise ValueError(f"{source}: hidden_act {values['hidden_act']!r} is not supported (only 'silu')")
    if cfg.get("head_dim") is None:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    for name in _INT_FIELDS & values.keys():
        if values[name] is not None and not isinstance(values[name], int):
            raise ValueError(f"{source}: field {name!r} must be an integer, got {values[name]!r}")
    for name in _BOOL_FIELDS & values.keys():
        if not isinstance(values[name], bool):
            raise ValueError(f"{source}: field {name!r} must be true or false, got {values[name]!r}")

    n_layers = values["num_hidden_layers"]
    interval = int(cfg.get("no_rope_layer_interval") or 4)
    no_rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layers)]
    if len(no_rope) < n_layers:
        raise ValueError(f"{source}: no_rope_layers has {len(no_rope)} entries for {n_layers} layers")
    step = int(cfg.get("interleave_moe_layer_step") or 1)
    moe_layers = cfg.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, n_layers, step))
    values["no_rope_layers"] = tuple(int(x) for x in no_rope[:n_layers])
    layer_types = cfg.get("layer_types") or ["chunked_attention" if x else "full_attention" for x in values["no_rope_layers"]]
    if len(layer_types) != n_layers or set(layer_types) - {"chunked_attention", "full_attention"}:
        raise ValueError(f"{source}: layer_types must list 'chunked_attention'/'full_attention' for each of {n_layers} layers")
    values["layer_types"] = tuple(layer_types)
    values["moe_layers"] = tuple(int(x) for x in moe_layers)
    values["rope_theta"], values["rope_scaling"] = _rope_from_hf(cfg, source)
    if values["num_attention_heads"] % values["num_key_value_heads"]:
        raise ValueError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
    if not math.isfinite(float(values["floor_scale"])) or float(values["floor_scale"]) <= 0:
        raise ValueError(f"{source}: floor_scale must be a positive number")
    return Llama4TextArgs(**values)


def _layer_kind(args: Llama4TextArgs, layer_idx: int) -> tuple[bool, bool, str]:
    return args.is_moe_layer(layer_idx), args.uses_rope(layer_idx), args.layer_types[layer_idx]


def layer_period(args: Llama4TextArgs) -> int:
    """The fewest layers whose kinds (MoE or dense, RoPE or NoPE, chunked or global attention) repeat through the
    decoder: 4 for Scout (every layer MoE, every 4th NoPE) and Maverick (MoE every 2nd layer)."""
    n = args.num_hidden_layers
    return next(p for p in range(1, n + 1) if n % p == 0
                and all(_layer_kind(args, i) == _layer_kind(args, i % p) for i in range(n)))


def first_layers(config: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """The HF text config of the same model cut to its first ``layers`` decoder layers, each of the same kind as in
    the whole model (the per-layer lists written out, so no default re-derives them differently)."""
    args = load_text_args(config)
    if not 0 < layers <= args.num_hidden_layers:
        raise ValueError(f"layers must lie in 1..{args.num_hidden_layers}, got {layers}")
    return {**config, "num_hidden_layers": layers, "moe_layers": [i for i in args.moe_layers if i < layers],
            "no_rope_layers": list(args.no_rope_layers[:layers]), "layer_types": list(args.layer_types[:layers])}
