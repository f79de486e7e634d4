"""Tiny-weights checkpoints with the structure of the hub Llama 4 configs in tests/fixtures/.

``shrink_config`` keeps every key and every value's JSON type of a published config and only makes the dimensions
small; ``tiny_checkpoint`` writes that config as published (un-normalized) beside random weights and the embedded
tokenizer carrying the fixture's own chat template.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
TRAINABLE = [name for name in NAMES if not name.endswith("-FP8")]

_TEXT_DIMS = {"hidden_size": 64, "intermediate_size": 64, "intermediate_size_mlp": 128, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
              "attention_chunk_size": 32}
_VISION_DIMS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "image_size": 28, "vision_output_dim": 32, "projector_input_dim": 32, "projector_output_dim": 32}
# Published special-token ids -> the embedded tokenizer's token of the same name (eom has none: eot stands in).
_TOKEN_NAMES = {200000: "<|begin_of_text|>", 200001: "<|end_of_text|>", 200007: "<|eot|>", 200008: "<|eot|>",
                200018: "<|finetune_right_pad|>"}


def read(name: str, file: str = "config.json") -> dict[str, Any]:
    return json.loads((FIXTURES / name / file).read_text())


@functools.lru_cache(maxsize=1)
def _embedded_tokenizer() -> Any:
    from embedded import tokenizer

    return tokenizer.train_shipped_bpe()


def _token_id(value: Any) -> Any:
    vocab = _embedded_tokenizer().get_vocab()
    if isinstance(value, list):
        return [_token_id(v) for v in value]
    return vocab[_TOKEN_NAMES[value]] if isinstance(value, int) else value


def _shrink_text(text: dict[str, Any]) -> None:
    for key, small in _TEXT_DIMS.items():
        if key in text and text[key] is not None:
            text[key] = type(text[key])(small)
    text["vocab_size"] = _embedded_tokenizer().get_vocab_size()
    layers = text["num_hidden_layers"]
    for key in ("no_rope_layers", "layer_types"):
        if key in text:
            text[key] = text[key][:layers]
    if "moe_layers" in text:
        step = text.get("interleave_moe_layer_step") or 1
        text["moe_layers"] = list(range(step - 1, layers, step))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in text:
            text[key] = _token_id(text[key])


def shrink_config(config: dict[str, Any]) -> dict[str, Any]:
    """Same keys and value types, small dims; rope, temperature tuning and layer patterns as published."""
    small = copy.deepcopy(config)
    _shrink_text(small.get("text_config", small))
    vision = small.get("vision_config")
    if isinstance(vision, dict):
        for key, value in _VISION_DIMS.items():
            vision[key] = type(vision[key])(value)
    return small


def _same_structure(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths where two configs differ in keys or JSON value types (lists compared by element type)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in _same_structure(a[k], b[k], f"{where}.{k}")]
    if type(a) is not type(b):
        return [f"{where}: {type(a).__name__} != {type(b).__name__}"]
    if isinstance(a, list) and a and b:
        return _same_structure(a[0], b[0], f"{where}[0]")
    return []


def small_files(name: str, out: Path) -> Path:
    """The fixture's config (shrunk, as published), its generation config and the embedded tokenizer with the
    fixture's chat template (or none, where the repo has none), written into ``out``."""
    from embedded import tokenizer as tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(shrink_config(read(name)), indent=2) + "\n")
    generation = {k: _token_id(v) if k.endswith("token_id") else v for k, v in read(name, "generation_config.json").items()}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tiny_tokenizer.save_tokenizer(out, _embedded_tokenizer())
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    published = read(name, "tokenizer_config.json")
    if "chat_template" in published:
        tok_config["chat_template"] = published["chat_template"]
    else:  # a base repo ships none
        del tok_config["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return out


def tiny_checkpoint(name: str, out: Path, seed: int = 0) -> Path:
    """A loadable checkpoint directory: ``small_files`` plus random bf16 weights of that structure."""
    import torch
    import transformers

    from llama4tune.config import normalize_hf_config

    published = shrink_config(read(name))
    config = transformers.AutoConfig.for_model(**normalize_hf_config(published)[0])
    torch.manual_seed(seed)
    model = getattr(transformers, published["architectures"][0])(config).to(torch.bfloat16)
    model.generation_config = transformers.GenerationConfig()  # the repo's own is written by small_files
    model.save_pretrained(out)
    return small_files(name, out)
