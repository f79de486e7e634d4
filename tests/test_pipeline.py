"""The pipeline's DAG (flows/pipeline.py): which step reads which, what waits for the gate, what a profile runs."""

from __future__ import annotations

import pytest

from finetune.profile import load_profile
from flows.pipeline import BENCHMARKS, PIPELINE, STEPS, pipeline, stage_keys, steps_until


def test_each_model_is_benchmarked_as_soon_as_it_exists() -> None:
    # The bf16 model's serving numbers do not wait for quantization; a rejected model is not served.
    assert STEPS["benchmark-bf16"].inputs == {"model": "convert", "pack": "pack"}
    assert STEPS["benchmark-bf16"].after_gate
    assert STEPS["benchmark-w4a16"].inputs == {"model": "quantize", "pack": "pack"}
    assert "quantize" not in STEPS["benchmark-bf16"].inputs.values()


def test_the_two_benchmarks_have_their_own_keys_and_a_serving_setting_changes_both() -> None:
    profile = load_profile("tiny-cpu")
    keys = stage_keys(profile, PIPELINE)
    assert keys["benchmark-bf16"] != keys["benchmark-w4a16"]
    other = stage_keys(load_profile("tiny-cpu", ["benchmark.max_tokens=7"]), PIPELINE)
    assert all(keys[label] != other[label] for label in BENCHMARKS.values())
    # Which weights a profile serves chooses the steps, not the numbers of the ones it runs.
    served = stage_keys(load_profile("tiny-cpu", ["benchmark.weights=[w4a16]"]), PIPELINE[:-1])
    assert served["benchmark-w4a16"] == keys["benchmark-w4a16"]


def test_a_profile_serving_only_4_bit_has_no_bf16_benchmark_and_publish_reads_what_runs() -> None:
    profile = load_profile("tiny-cpu", ["benchmark.weights=[w4a16]"])
    steps = {step.label: step for step in pipeline(profile)}
    assert "benchmark-bf16" not in steps and "benchmark-w4a16" in steps
    assert "benchmark-bf16" not in steps["publish"].inputs.values()
    assert [step.label for step in steps_until("benchmark", profile)][-1] == "benchmark-w4a16"
    keys = stage_keys(profile, steps.values())  # publish's key is computed without the missing optional input
    assert len(keys["publish"]) == 20


def test_until_a_step_runs_it_after_its_stages_earlier_steps_with_what_they_read_and_the_gate_it_waits_for() -> None:
    profile = load_profile("tiny-cpu")
    assert [s.label for s in steps_until("evaluate-tuned", profile)] == ["download", "pack", "train", "convert",
                                                                         "evaluate-base", "evaluate-tuned"]
    assert [s.label for s in steps_until("evaluate-base", profile)] == ["download", "evaluate-base"]
    assert [s.label for s in steps_until("benchmark-bf16", profile)][-3:] == ["evaluate-base", "evaluate-tuned",
                                                                              "benchmark-bf16"]
    with pytest.raises(ValueError, match="no step|unknown step"):
        steps_until("quantize-base", profile)  # a step of 4-bit-evaluating profiles only


def test_an_optional_input_is_part_of_the_key_when_the_run_has_it() -> None:
    full = stage_keys(load_profile("tiny-cpu"), PIPELINE)
    only_4_bit = stage_keys(load_profile("tiny-cpu", ["benchmark.weights=[w4a16]"]),
                            pipeline(load_profile("tiny-cpu", ["benchmark.weights=[w4a16]"])))
    # publish's settings are the same in both profiles: only the bf16 benchmark's presence differs.
    assert full["publish"] != only_4_bit["publish"]


def test_until_evaluate_at_four_bits_runs_both_quantizations_and_the_gates_evaluations() -> None:
    # They read quantize-base and quantize, a later stage: left out, the run stopped after convert and "succeeded".
    profile = load_profile("tiny-cpu", ["train.method=qlora", "evaluate.weights=w4a16"])
    assert [s.label for s in steps_until("evaluate", profile)] == ["download", "pack", "train", "convert",
                                                                   "quantize-base", "evaluate-base", "quantize",
                                                                   "evaluate-tuned"]
    assert [s.label for s in steps_until("evaluate", load_profile("tiny-cpu"))] == [
        "download", "pack", "train", "convert", "evaluate-base", "evaluate-tuned"]
