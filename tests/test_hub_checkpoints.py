"""The hub's Llama 4 checkpoints as published (tests/fixtures/): read through one normalized config, parity with
transformers, llama3 rope by its formula, the chat template, and permanent errors that fail once."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from finetune.profile import ProfileError, load_profile
from finetune.stage import PermanentError, StageContext, execute_stage
from finetune.store import Store
from llama4tune.config import load_text_args, normalize_hf_config
from tasks import download
from tests.llama4_fixtures import NAMES, TRAINABLE, read, shrink_config, tiny_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    return {name: tiny_checkpoint(name, root / name) for name in TRAINABLE}


def _download(model: Path, store: Path):
    profile = load_profile("tiny-cpu", ["model.source=local", f"model.path={model}"])
    return execute_stage(download.SPEC, profile, Store(store), {})


@pytest.mark.parametrize("name", NAMES)
def test_published_config_is_rejected_by_transformers_only_where_normalized(name):
    from transformers import AutoConfig

    published = read(name)
    normalized, changes = normalize_hf_config(published)
    AutoConfig.for_model(**normalized)  # loads
    if any(c.field.endswith("attn_temperature_tuning") for c in changes):
        with pytest.raises(Exception, match="attn_temperature_tuning"):
            AutoConfig.for_model(**published)
    assert all(c.published == 4 and c.normalized is True and "AutoConfig.from_pretrained" in c.needed_by
               for c in changes)
    # Nothing else changed: dtype and rope keys stay as published.
    assert {c.field for c in changes} <= {"attn_temperature_tuning", "text_config.attn_temperature_tuning"}


@pytest.mark.parametrize("name", NAMES)
def test_normalized_config_keeps_published_semantics_in_transformers_and_our_model(name):
    from transformers import AutoConfig

    published = read(name)
    text = published.get("text_config", published)
    config = AutoConfig.for_model(**normalize_hf_config(published)[0])
    hf_text = getattr(config, "text_config", config)
    args = load_text_args(published)
    rope = text["rope_scaling"]
    assert hf_text.rope_parameters["rope_theta"] == args.rope_theta == text["rope_theta"]
    if rope:
        assert {k: hf_text.rope_parameters[k] for k in rope} == rope
        assert args.rope_scaling == {k: rope[k] for k in args.rope_scaling}
    else:
        assert hf_text.rope_parameters["rope_type"] == "default" and args.rope_scaling is None
    assert hf_text.attn_temperature_tuning is True and args.attn_temperature_tuning is True
    assert hf_text.attention_chunk_size == args.attention_chunk_size == text["attention_chunk_size"]
    assert list(hf_text.no_rope_layers) == list(args.no_rope_layers)
    assert list(hf_text.moe_layers) == list(args.moe_layers)
    assert hf_text.interleave_moe_layer_step == text["interleave_moe_layer_step"]
    assert hf_text.use_qk_norm == args.use_qk_norm == text["use_qk_norm"]
    assert str(hf_text.dtype).endswith(text["torch_dtype"])


@pytest.mark.parametrize("name", NAMES)
def test_shrunk_config_keeps_every_key_and_type(name):
    from tests.llama4_fixtures import _same_structure

    assert _same_structure(read(name), shrink_config(read(name))) == []


def _llama3_inv_freq(head_dim: int, theta: float, factor: float, low: float, high: float, old_len: float) -> list[float]:
    """Llama 3.1's frequency scaling, written from its definition: wavelengths longer than old_len/low are divided
    by factor, shorter than old_len/high kept, and in between interpolated by s = (old_len/wavelen - low)/(high - low)
    as (1 - s) * f / factor + s * f."""
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            out.append(f)
        elif wavelen > old_len / low:
            out.append(f / factor)
        else:
            s = (old_len / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return out


@pytest.mark.parametrize("name", [n for n in NAMES if (read(n).get("text_config") or read(n))["rope_scaling"]])
def test_llama3_rope_frequencies_follow_the_formula(name):
    from llama4tune.rope import llama4_inv_freq

    args = load_text_args(read(name))
    s = args.rope_scaling
    expected = _llama3_inv_freq(args.head_dim, args.rope_theta, s["factor"], s["low_freq_factor"],
                                s["high_freq_factor"], s["original_max_position_embeddings"])
    got = llama4_inv_freq(args.head_dim, args.rope_theta, s)
    assert torch.allclose(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
    assert got[-1] < got[0] / 2  # low frequencies really were scaled


@pytest.mark.parametrize("name", TRAINABLE)
def test_fp32_logits_match_transformers_built_from_the_same_normalized_config(name, checkpoints):
    import transformers

    from llama4tune import llama4_from_hf_config
    from llama4tune.convert import hf_to_tune

    config_path = checkpoints[name] / "config.json"
    normalized = normalize_hf_config(json.loads(config_path.read_text()))[0]
    hf_config = transformers.AutoConfig.for_model(**normalized)
    hf_text = getattr(hf_config, "text_config", hf_config)
    torch.manual_seed(0)
    hf = transformers.Llama4ForCausalLM(hf_text).float().eval()
    with torch.no_grad():
        for pname, param in hf.named_parameters():
            if pname.endswith("router.weight"):
                param.normal_(std=0.5)
    text = normalized.get("text_config", normalized)
    model = llama4_from_hf_config(text)
    model.load_state_dict(hf_to_tune(hf.state_dict(), text), strict=True)
    model.eval()
    seq_len = 2 * text["attention_chunk_size"] + 5
    tokens = torch.randint(0, text["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4, f"{name}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("name", TRAINABLE)
def test_download_normalizes_config_and_keeps_the_published_bytes(name, checkpoints, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    artifact, tables = _download(checkpoints[name], tmp_path / "store")
    out = Path(artifact.path)
    published = (checkpoints[name] / "config.json").read_bytes()
    text = json.loads(published).get("text_config", json.loads(published))
    changes = artifact.metrics["config_normalized"]
    if "chat_template" not in read(name, "tokenizer_config.json"):  # a base repo: Llama 4's chat format is added
        assert changes[-1]["field"] == "tokenizer_config.json: chat_template"
        assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
        assert (out / download.PUBLISHED_DIR / "tokenizer_config.json").read_bytes() == (
            checkpoints[name] / "tokenizer_config.json").read_bytes()
        changes = changes[:-1]
    if "attn_temperature_tuning" in text:  # the int 4 transformers rejects: normalized, published bytes kept aside
        assert [c["field"].split(".")[-1] for c in changes] == ["attn_temperature_tuning"]
        assert (out / download.PUBLISHED_DIR / "config.json").read_bytes() == published
        assert f"{download.PUBLISHED_DIR}/config.json" in artifact.files  # hashed in the manifest like every file
    else:  # nothing to normalize: config.json is the published file itself
        assert changes == [] and (out / "config.json").read_bytes() == published
    assert tables["config_normalized"] == artifact.metrics["config_normalized"]
    AutoConfig.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)  # reads config.json too (transformers PR 44882's failure)


def test_text_only_download_then_pack_uses_the_published_chat_template(checkpoints, tmp_path):
    from tasks.pack import SPEC as PACK

    name = "llama4-scout-text-only-finetune"
    store = tmp_path / "store"
    profile = load_profile("tiny-cpu", ["model.source=local", f"model.path={checkpoints[name]}"])
    downloaded, _ = execute_stage(download.SPEC, profile, Store(store), {})
    packed, _ = execute_stage(PACK, profile, Store(store), {"download": downloaded})
    prompts = [json.loads(line) for line in (Path(packed.path) / "prompts.jsonl").read_text().splitlines()]
    assert prompts and packed.metrics


@pytest.mark.parametrize("name", TRAINABLE)
def test_chat_template_renders_the_shipped_data_with_llama4_headers(name, checkpoints, tmp_path):
    from transformers import AutoTokenizer

    # Through the download artifact: AutoTokenizer reads config.json, which as published it cannot load.
    tokenizer = AutoTokenizer.from_pretrained(_download(checkpoints[name], tmp_path / "store")[0].path)
    record = json.loads(Path("embedded/data/train.jsonl").read_text().splitlines()[0])
    messages = record["messages"]
    # The fixture's own template; a base repo's (none) is Llama 4's format added by download.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    expected = "<|begin_of_text|>" + "".join(
        f"<|header_start|>{m['role']}<|header_end|>\n\n{m['content'].strip() if m['role'] == 'system' else m['content']}"
        "<|eot|>" for m in messages)
    assert text == expected
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|header_start|>assistant<|header_end|>\n\n") and text.startswith(prompt)


def _ctx(profile, workdir: Path) -> StageContext:
    workdir.mkdir(parents=True, exist_ok=True)
    return StageContext(profile=profile, key="k", workdir=workdir, inputs={})


@pytest.mark.parametrize("repo_id,instead", [
    ("meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8", "meta-llama/Llama-4-Maverick-17B-128E-Instruct instead"),
    ("someone/Llama-4-Scout-17B-16E-Instruct-fp8", r"quantized from \(someone/Llama-4-Scout-17B-16E-Instruct\?\)"),
])
def test_fp8_repo_is_refused_at_profile_validation_naming_the_bf16_repo(repo_id, instead):
    with pytest.raises(ProfileError, match=rf"model: repo_id: {re.escape(repo_id)} holds FP8-quantized.*{instead}"):
        load_profile("maverick-lora", [f"model.repo_id={repo_id}"])


def test_a_quantized_local_base_is_refused_before_any_file_is_copied(checkpoints, tmp_path):
    model = tmp_path / "fp8"
    shutil.copytree(checkpoints["Llama-4-Maverick-17B-128E-Instruct"], model)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = read("Llama-4-Maverick-17B-128E-Instruct-FP8")["quantization_config"]
    (model / "config.json").write_text(json.dumps(config))
    profile = load_profile("tiny-cpu", ["model.source=local", f"model.path={model}"])
    with pytest.raises(PermanentError, match=r"quantization_config.*compressed-tensors.*bf16"):
        download.run(_ctx(profile, tmp_path / "work"))
    assert not any((tmp_path / "work").iterdir())


@pytest.mark.parametrize("breakage,message", [
    (lambda d: (d / "config.json").write_text('{"architectures": ["Llama4ForCausalLM"],\n "hidden_size": }'),
     r"config.json: invalid JSON at line 2"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "architectures": ["LlamaForCausalLM"]})),
     r"config.json: field 'architectures' is \['LlamaForCausalLM'\]"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "num_key_value_heads": "eight"})),
     r"config.json.*num_key_value_heads"),
    (lambda d: (d / "tokenizer.json").unlink(), r"tokenizer.json: missing"),
], ids=["bad-json", "unknown-architecture", "wrong-field-type", "missing-tokenizer"])
def test_a_broken_checkpoint_fails_once_naming_file_and_field(breakage, message, checkpoints, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(checkpoints["llama4-scout-text-only-finetune"], model)
    breakage(model)
    with pytest.raises(PermanentError, match=message):  # PermanentError: the flow does not retry it
        _download(model, tmp_path / "store")
