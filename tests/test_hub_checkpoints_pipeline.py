"""Each hub Llama 4 checkpoint as published (tests/fixtures/), at tiny size, through the pipeline's stages:
download (local) -> pack -> train -> convert -> evaluate, run by execute_stage along flows.pipeline (no Prefect).

The converted checkpoint must load in transformers with the published semantics and compute, in fp32, what the
trained model computed.

Cost (2 CPU cores): about 2.5 min for the four fixtures, 30-35 s each, two thirds of it the trainer's start and its
3 steps. Each fixture packs its own data (1-2 s): one shared pack would save a few seconds and skip a real stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from finetune.store import Artifact
from tests.llama4_fixtures import TRAINABLE, read, tiny_checkpoint

pytestmark = pytest.mark.slow  # trains and evaluates once per fixture

TARGET = "evaluate-tuned"
# Smallest settings that still run every stage for real: sequences span two attention chunks of the shrunk configs.
SMALL = [
    "data.max_seq_len=64", "train.max_steps=3", "train.batch_size=2", "train.warmup_steps=1",
    "convert.dtype=fp32", "evaluate.limit=4", "evaluate.tasks=[tiny_synth_mc]", "evaluate.batch_size=4",
]


def run_pipeline(model: Path, store: Path) -> dict[str, Artifact]:
    """Every step ``TARGET`` needs, upstream first, through execute_stage."""
    from finetune.profile import load_profile
    from finetune.stage import execute_stage
    from finetune.store import Store
    from flows import pipeline

    profile = load_profile("tiny-cpu", ["model.source=local", f"model.path={model}", *SMALL])
    done: dict[str, Artifact] = {}
    for step in pipeline.needed([TARGET]):
        done[step.label], _ = execute_stage(pipeline.spec(step.stage), profile, Store(str(store)),
                                            pipeline.step_inputs(step, done))
    return done


def trained_model(download: Path, train: Path) -> torch.nn.Module:
    """The train artifact's final weights (DCP of {"model": state_dict}) in llama4tune's model, read as data only."""
    from llama4tune.checkpoint_pickle import load_dcp
    from llama4tune import llama4_from_hf_config
    from tunerecipes.checkpoint_layout import FINAL_DIR

    model = llama4_from_hf_config(download / "config.json")
    state = {"model": model.state_dict()}
    load_dcp(state, train / FINAL_DIR, no_dist=True)
    model.load_state_dict(state["model"], strict=True)
    return model.float().eval()


def _text(config: Any) -> Any:
    return getattr(config, "text_config", config)


def assert_published_semantics(name: str, converted: Path) -> None:
    """The converted config loads in transformers and means what the published one means."""
    from transformers import AutoConfig

    from llama4tune.config import normalize_hf_config
    from tests.llama4_fixtures import shrink_config

    published = shrink_config(read(name))
    text = published.get("text_config", published)
    got = _text(AutoConfig.from_pretrained(converted))
    want = _text(AutoConfig.for_model(**normalize_hf_config(published)[0]))
    rope = text["rope_scaling"] or {"rope_type": "default"}
    assert got.rope_parameters["rope_type"] == rope["rope_type"] == want.rope_parameters["rope_type"]
    assert got.rope_parameters.get("factor") == rope.get("factor")
    assert got.rope_parameters["rope_theta"] == text["rope_theta"]
    # Published as the int 4 by transformers 4.51: on. Absent: transformers' default (on) as the published reader saw.
    assert got.attn_temperature_tuning is True and bool(text.get("attn_temperature_tuning", True))
    assert got.attention_chunk_size == text["attention_chunk_size"]
    assert got.interleave_moe_layer_step == text["interleave_moe_layer_step"]
    assert got.num_local_experts == text["num_local_experts"]
    assert list(got.no_rope_layers) == list(text.get("no_rope_layers") or want.no_rope_layers)
    assert list(got.moe_layers) == list(want.moe_layers)


@pytest.mark.parametrize("name", TRAINABLE)
def test_hub_checkpoint_goes_through_every_stage_and_converts_to_what_was_trained(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    done = run_pipeline(tiny_checkpoint(name, tmp_path / "model"), tmp_path / "store")
    assert list(done) == ["download", "pack", "train", "convert", TARGET]
    assert all(artifact.timings.get("finished") for artifact in done.values())
    assert done["train"].metrics["steps"] == 3
    scores = json.dumps(done[TARGET].metrics)
    assert "tiny_synth_mc" in scores

    converted = Path(done["convert"].path)
    assert_published_semantics(name, converted)

    trained = trained_model(Path(done["download"].path), Path(done["train"].path))
    multimodal = "text_config" in read(name)
    loader = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    hf = loader.from_pretrained(converted, dtype=torch.float32).eval()
    text = json.loads((converted / "config.json").read_text())
    text = text.get("text_config", text)
    seq_len = 2 * text["attention_chunk_size"] + 5
    tokens = torch.randint(0, text["vocab_size"], (2, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (trained(tokens) - hf(input_ids=tokens).logits).abs().max().item()
    assert diff <= 1e-4, f"{name}: converted logits differ from the trained model's by {diff:.2e}"
