"""QLoRA through the real trainer on the tiny Llama 4 (CPU, fp32): NF4 base, adapters-only DCP checkpoints and
resume, then convert merging the adapters into the download's base weights. Short runs: the cost is in starting the
trainer, not in the steps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.procs import ProcessFailed
from finetune.profile import load_profile
from finetune.stage import StageContext, execute_stage
from finetune.store import Store
from tasks import convert, download, pack, train
from tasks.convert.sources import DcpSource
from tests.conftest import isolated_env, parse_summary, run_cli
from tests.test_train import kill_trainer_at_step

pytestmark = pytest.mark.slow  # starts real trainers

STEPS, EVERY = 6, 2
QLORA = ["train.method=qlora", "data.max_seq_len=64", f"train.max_steps={STEPS}", "train.batch_size=2",
         "train.warmup_steps=1", "train.lr=1.0e-2", f"train.checkpoint_every_steps={EVERY}",
         "train.recipe_overrides={num_threads: 1}"]


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def test_qlora_trains_adapters_on_an_nf4_base_resumes_and_converts_onto_the_bf16_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_SCRATCH", str(tmp_path / "scratch"))
    profile = load_profile("tiny-cpu", QLORA)
    store = Store(tmp_path / "store")
    base, _ = execute_stage(download.SPEC, profile, store, {})
    packed, _ = execute_stage(pack.SPEC, profile, store, {"download": base})
    trained, _ = execute_stage(train.SPEC, profile, store, {"download": base, "pack": packed})
    work = Path(trained.path)
    assert trained.metrics["method"] == "qlora" and trained.metrics["last_loss"] < trained.metrics["first_loss"]

    # The final checkpoint holds the adapters only.
    final = DcpSource(work / "final")
    assert final.tensors() and all(".lora_" in key for key in final.tensors()), sorted(final.tensors())[:5]
    meta = json.loads((work / "final" / "train_meta.json").read_text())
    assert meta["method"] == "qlora" and meta["model"]["quantize_base"] is True

    # A run killed in step 5 (the stage deletes a finished run's mid-run checkpoints): its newest checkpoint (step 4)
    # holds the adapters (and their optimizer state) only, and resuming from it brings them back exactly.
    again = tmp_path / "again"
    again.mkdir()
    ctx = StageContext(profile=profile, key=trained.key, workdir=again, inputs={"download": base, "pack": packed},
                       tables={}, log=kill_trainer_at_step(STEPS - EVERY + 1))
    with pytest.raises(ProcessFailed, match="signal 9"):
        train.run(ctx)
    checkpoint = DcpSource(again / "checkpoints" / f"step_{STEPS - EVERY}")
    assert all(".lora_" in key for key in checkpoint.tensors() if key.startswith("model."))
    resumed = train.run(dataclasses.replace(ctx, log=lambda line: None))
    assert resumed["resumed_from_step"] == STEPS - EVERY
    assert _losses(again) == pytest.approx(_losses(work), abs=1e-6)

    converted, _ = execute_stage(convert.SPEC, profile, store, {"download": base, "train": trained})
    out = Path(converted.path)
    assert converted.metrics["method"] == "qlora" and converted.metrics["peft_adapter"] == "adapter"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # Merged onto the download's weights, not the NF4 copy: the routed experts (trained in NF4, no adapters) come
    # out exactly as the base has them.
    merged = {k: v for f in out.glob("model-*.safetensors") for k, v in load_file(f).items()}
    original = {k: v for f in Path(base.path).glob("*.safetensors") for k, v in load_file(f).items()}
    key = "model.layers.0.feed_forward.experts.gate_up_proj"
    assert torch.equal(merged[key], original[key].to(merged[key].dtype))
    adapted = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[adapted], original[adapted].to(merged[adapted].dtype))


def test_qlora_under_fsdp_on_two_processes_matches_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP2 shards the NF4 weights (torchao splits their codes and scales, gathers them for each unit): the first
    steps' losses are one process's. Later ones drift by ~1% as plain LoRA's do (measured: FSDP initialises each
    shard of the A matrices from its own random stream), so only the first two are compared exactly."""
    monkeypatch.setenv("FINETUNE_SCRATCH", str(tmp_path / "scratch"))
    results = {}
    for label, extra in {"one": [], "two": ["train.nproc_per_node=2", "train.batch_size=1"]}.items():
        profile = load_profile("tiny-cpu", [*QLORA, *extra])
        store = Store(tmp_path / label)
        base, _ = execute_stage(download.SPEC, profile, store, {})
        packed, _ = execute_stage(pack.SPEC, profile, store, {"download": base})
        trained, _ = execute_stage(train.SPEC, profile, store, {"download": base, "pack": packed})
        assert trained.metrics["world_size"] == (2 if extra else 1)
        results[label] = _losses(Path(trained.path))
    assert [results["two"][step] for step in (1, 2)] == pytest.approx([results["one"][step] for step in (1, 2)],
                                                                      rel=1e-4)
    assert results["two"][STEPS] < results["two"][1] - 0.5


def test_four_bit_evaluation_through_a_pipeline_run_scores_the_4bit_base_and_gates_4bit_against_4bit(
        tmp_path: Path) -> None:
    """`evaluate.weights: w4a16` (scout-qlora's evaluation) end to end on the tiny model: the base is quantized the
    way the tuned model is (quantize-base), both 4-bit models are scored and the gate compares those two scores.
    That the base's 4-bit artifact and its scores are computed once whatever training does is a property of their
    keys (tests/test_qlora.py, test_four_bit_evaluation_quantizes_the_base_once_and_gates_like_with_like). The gate
    is set to pass (a few steps teach nothing): what is checked is what it compared."""
    env = isolated_env(tmp_path)
    proc = run_cli(env, "run", "--profile", "tiny-cpu", "--until", "quantize", "--json", "train.method=qlora",
                   "evaluate.weights=w4a16", "data.max_seq_len=64", "train.max_steps=2", "train.batch_size=2",
                   "evaluate.limit=4", "evaluate.max_gen_toks=8", "quantize.calibration_samples=4",
                   "quantize.calibration_seq_len=64", "evaluate.gate.require_rise=null", "evaluate.gate.max_drop=100")
    assert "quality-gate" in proc.stderr and "the tuned model passed" in proc.stderr
    stages = parse_summary(proc.stdout)["stages"]
    assert "evaluate-quantized" not in stages and not any(stage["cached"] for stage in stages.values())
    # What the gate read: the 4-bit base (quantize-base of the download) against the 4-bit tuned model.
    evaluated = {label: json.loads((Path(stages[label]["path"]) / "results.json").read_text())["finetune"]["model"]
                 for label in ("evaluate-base", "evaluate-tuned")}
    assert evaluated == {"evaluate-base": {"stage": "quantize", "key": stages["quantize-base"]["key"]},
                         "evaluate-tuned": {"stage": "quantize", "key": stages["quantize"]["key"]}}
    assert stages["quantize-base"]["path"] != stages["quantize"]["path"]
