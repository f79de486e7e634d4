"""evaluate: lm-eval on a real tiny Llama 4; bad tasks fail before any model load; deltas, gate and recovery."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from embedded.tiny_model import build_tiny_model
from finetune.profile import GateConfig, RequireRise, load_profile
from finetune.stage import PermanentError, StageContext, execute_stage, stage_key
from finetune.store import Artifact, Store
from tasks import evaluate
from tasks.evaluate import harness

LOCAL_TASKS = Path(evaluate.__file__).resolve().parents[2] / "embedded" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    path = build_tiny_model(tmp_path_factory.mktemp("model") / "base", seed=0)
    return Artifact(stage="download", key="tiny-base", path=str(path))


def _context(tmp_path: Path, model: Artifact, *overrides: str) -> StageContext:
    profile = load_profile("tiny-cpu", list(overrides))
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    return StageContext(profile=profile, key="k", workdir=workdir, inputs={"model": model})


def test_local_tasks_score_a_tiny_llama4_through_its_chat_template(tmp_path: Path, tiny_model: Artifact) -> None:
    profile = load_profile("tiny-cpu", ["evaluate.limit=8", "evaluate.tasks=[tiny_synth_em,tiny_synth_mc]"])
    artifact, tables = execute_stage(evaluate.SPEC, profile, Store(tmp_path / "store"), {"model": tiny_model})

    results = json.loads((Path(artifact.path) / "results.json").read_text())
    assert results["lm_eval_version"] == "0.4.13" == artifact.metrics["lm_eval_version"]
    assert results["n-samples"]["tiny_synth_em"] == {"original": 200, "effective": 8}
    assert results["configs"]["tiny_synth_em"]["output_type"] == "generate_until"
    assert results["configs"]["tiny_synth_mc"]["output_type"] == "multiple_choice"
    assert results["config"]["apply_chat_template"] is True
    assert results["finetune"]["eval_seconds"] > 0 and results["finetune"]["model"]["key"] == "tiny-base"
    # A random base model cannot reverse letters; the four-way choice sits near chance.
    assert artifact.metrics["scores"]["tiny_synth_em/exact_match"] == 0.0
    assert 0.0 <= artifact.metrics["scores"]["tiny_synth_mc/acc"] <= 100.0
    assert "tiny_synth_mc/acc" in artifact.metrics["stderr"]
    assert {(r["task"], r["metric"]) for r in tables["evaluate"]} == {
        ("tiny_synth_em", "exact_match"), ("tiny_synth_mc", "acc"), ("tiny_synth_mc", "brier_score")}
    assert not next(r for r in tables["evaluate"] if r["metric"] == "brier_score")["higher_is_better"]

    with gzip.open(Path(artifact.path) / "samples" / "tiny_synth_em.jsonl.gz", "rt") as handle:
        first = json.loads(handle.readline())
    prompt, gen_kwargs = first["arguments"][0]
    assert prompt.startswith("<|begin_of_text|><|header_start|>user<|header_end|>\n\nReverse the letters: ")
    assert prompt.endswith("<|header_start|>assistant<|header_end|>\n\n")
    assert gen_kwargs["max_gen_toks"] == 16 and gen_kwargs["do_sample"] is False

    # The comparison reads the artifacts' files: a model against itself moves nothing, so a required rise fails.
    rows = evaluate.compare(artifact, artifact)
    assert all(row.delta == 0 for row in rows)
    with pytest.raises(evaluate.GateFailed, match=r"tiny_synth_em exact_match rose 0.0 points \(0.0 -> 0.0\)"):
        evaluate.check_gate(rows, profile.evaluate.gate)


def test_unknown_task_fails_before_the_model_is_loaded(tmp_path: Path) -> None:
    missing_model = Artifact(stage="convert", key="k", path=str(tmp_path / "no-such-model"))
    ctx = _context(tmp_path, missing_model, "evaluate.tasks=[tiny_synth_em,arc_challeng]")
    with pytest.raises(PermanentError, match=r"unknown lm-eval task 'arc_challeng' \(did you mean arc_challenge"):
        evaluate.run(ctx)


def _local_copy(tmp_path: Path, **replace: str) -> Path:
    include = tmp_path / "tasks"
    shutil.copytree(LOCAL_TASKS, include, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(LOCAL_TASKS.parent / "data", tmp_path / "data")
    for name, text in replace.items():
        (include / name).write_text(text)
    return include


@pytest.mark.parametrize("broken, message", [
    ("task: tiny_synth_em\n  output_type: [generate_until\n", "invalid lm-eval task YAML"),
    ("task: tiny_synth_em\ncustom_dataset: !function utils.no_such_loader\n", "invalid lm-eval task YAML"),
    ("output_type: generate_until\n", "needs a 'task'"),
])
def test_invalid_local_task_yaml_names_its_file_before_the_model_is_loaded(
    tmp_path: Path, broken: str, message: str
) -> None:
    include = _local_copy(tmp_path, **{"tiny_synth_em.yaml": broken})
    missing_model = Artifact(stage="convert", key="k", path=str(tmp_path / "no-such-model"))
    ctx = _context(tmp_path, missing_model, f"evaluate.include_path={include}")
    with pytest.raises(PermanentError, match=rf"tiny_synth_em\.yaml: .*{message}"):
        evaluate.run(ctx)


def test_local_task_whose_data_is_missing_names_its_file(tmp_path: Path) -> None:
    include = _local_copy(tmp_path)
    (tmp_path / "data" / "test.jsonl").unlink()
    ctx = _context(tmp_path, Artifact(stage="convert", key="k", path=str(tmp_path / "nope")),
                   f"evaluate.include_path={include}")
    with pytest.raises(PermanentError, match=r"tiny_synth_em\.yaml: task 'tiny_synth_em' cannot be built"):
        evaluate.run(ctx)


def test_key_follows_tasks_and_local_data_but_not_the_gate(tmp_path: Path) -> None:
    include = _local_copy(tmp_path)
    model = {"model": Artifact(stage="download", key="base", path="unused")}

    def key(*overrides: str) -> str:
        return stage_key(evaluate.SPEC, load_profile("tiny-cpu", [f"evaluate.include_path={include}", *overrides]),
                         model)

    before = key()
    assert key("evaluate.gate.require_rise.by=50") == before
    assert key("evaluate.tasks=[tiny_synth_mc]") != before
    with (tmp_path / "data" / "test.jsonl").open("a") as handle:
        handle.write('{"messages": [{"role": "user", "content": "Reverse the letters: a b"}, '
                     '{"role": "assistant", "content": "b a"}]}\n')
    assert key() != before


def test_server_model_args_are_local_completions_parameters_with_the_served_context_length() -> None:
    import inspect

    from lm_eval.models.api_models import TemplateAPI
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    maverick = load_profile("maverick-lora")
    assert maverick.evaluate.backend == "vllm"
    args = harness.completions_model_args("/models/tuned", "http://127.0.0.1:8123", maverick.benchmark.max_model_len,
                                          maverick.evaluate.max_gen_toks)
    accepted = set(inspect.signature(LocalCompletionsAPI).parameters) | set(inspect.signature(TemplateAPI).parameters)
    assert set(args) <= accepted
    assert args["base_url"] == "http://127.0.0.1:8123/v1/completions"  # echo + logprobs: completions, not chat
    # lm-eval's API backends default to max_length 2048 and left-truncate past it: the server's length, not that.
    assert args["max_length"] == maverick.benchmark.max_model_len != 2048
    assert args["tokenized_requests"] is True and args["tokenizer"] == args["model"] == "/models/tuned"
    assert args["max_gen_toks"] == maverick.evaluate.max_gen_toks


def test_hf_model_args_use_fp32_on_cpu() -> None:
    assert harness.hf_model_args("/m", "cpu") == {"pretrained": "/m", "dtype": "float32"}


def _results(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """lm-eval's output shape (as written by the stage) for a few standard tasks."""
    results: dict[str, Any] = {"results": {}, "higher_is_better": {}, "n-samples": {},
                               "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_other"]},
                               "finetune": {"reported_tasks": list(scores)}}
    for task, metrics in scores.items():
        results["results"][task] = {"alias": task, **metrics}
        results["higher_is_better"][task] = {k.split(",")[0]: True for k in metrics if "_stderr" not in k}
    results["n-samples"] = {"arc_challenge": {"original": 1172, "effective": 1172},
                            "gsm8k": {"original": 1319, "effective": 1319},
                            "mmlu_stem": {"original": 3153, "effective": 3153},
                            "mmlu_other": {"original": 3126, "effective": 3126}}
    return results


def _artifact(root: Path, name: str, results: dict[str, Any]) -> Artifact:
    (root / name).mkdir()
    (root / name / "results.json").write_text(json.dumps(results))
    return Artifact(stage="evaluate", key=name, path=str(root / name))


BASE = {
    "mmlu": {"acc,none": 0.7412, "acc_stderr,none": 0.0036},
    "arc_challenge": {"acc,none": 0.571, "acc_stderr,none": 0.0145, "acc_norm,none": 0.612,
                      "acc_norm_stderr,none": 0.0142},
    "gsm8k": {"exact_match,strict-match": 0.853, "exact_match_stderr,strict-match": 0.0098,
              "exact_match,flexible-extract": 0.861, "exact_match_stderr,flexible-extract": 0.0095},
}
TUNED = {
    "mmlu": {"acc,none": 0.7395, "acc_stderr,none": 0.0036},
    "arc_challenge": {"acc,none": 0.569, "acc_stderr,none": 0.0145, "acc_norm,none": 0.589,
                      "acc_norm_stderr,none": 0.0144},
    "gsm8k": {"exact_match,strict-match": 0.871, "exact_match_stderr,strict-match": 0.0092,
              "exact_match,flexible-extract": 0.874, "exact_match_stderr,flexible-extract": 0.0091},
}


def test_compare_reports_points_deltas_and_stderr(tmp_path: Path) -> None:
    rows = evaluate.compare(_artifact(tmp_path, "base", _results(BASE)), _artifact(tmp_path, "tuned", _results(TUNED)))
    by = {(r.task, r.metric): r for r in rows}
    arc = by[("arc_challenge", "acc_norm")]
    assert (arc.base, arc.tuned) == pytest.approx((61.2, 58.9)) and arc.delta == pytest.approx(-2.3)
    assert arc.stderr == pytest.approx((1.42**2 + 1.44**2) ** 0.5)
    assert by[("gsm8k", "exact_match,strict-match")].delta == pytest.approx(1.8)
    assert evaluate.scores(_artifact(tmp_path, "again", _results(BASE)))[0].samples == 3153 + 3126  # mmlu group
    table = evaluate.markdown_table(rows)
    assert table.splitlines()[0] == "| task | metric | base | tuned | delta | stderr | higher_is_better |"
    assert "| arc_challenge | acc_norm | 61.20 | 58.90 | -2.30 |" in table


def test_a_gate_failure_rebuilt_from_its_message_reads_the_same() -> None:
    failed = evaluate.GateFailed(["a rose 0.0 points", "b dropped 2.0 points"])
    rebuilt = evaluate.GateFailed(str(failed))  # how Prefect's JSON serializer brings an exception back
    assert str(rebuilt) == str(failed) and rebuilt.failures == failed.failures


def test_gate_names_every_task_that_dropped_too_far() -> None:
    rows = evaluate.compare_scores(evaluate.scores_from_results(_results(BASE)),
                                   evaluate.scores_from_results(_results(TUNED)))
    with pytest.raises(evaluate.GateFailed) as failed:
        evaluate.check_gate(rows, GateConfig(max_drop=1.0))
    assert failed.value.failures == [
        "arc_challenge acc_norm dropped 2.3 points (61.2 -> 58.9), gate allows 1"]
    assert isinstance(failed.value, PermanentError)
    evaluate.check_gate(rows, GateConfig(max_drop=2.5))  # within the allowance: passes
    evaluate.check_gate(rows, GateConfig(require_rise=RequireRise(task="gsm8k", by=1.5)))
    with pytest.raises(evaluate.GateFailed, match=r"gsm8k exact_match,flexible-extract rose 1.3 points "
                                                  r"\(86.1 -> 87.4\), gate requires a rise of at least 2"):
        rule = RequireRise(task="gsm8k", metric="exact_match,flexible-extract", by=2)
        evaluate.check_gate(rows, GateConfig(require_rise=rule))
    with pytest.raises(evaluate.GateFailed, match="names task 'ifeval', which was not evaluated"):
        evaluate.check_gate(rows, GateConfig(require_rise=RequireRise(task="ifeval", by=1)))


def test_recovery_is_the_share_of_the_bf16_score_kept() -> None:
    bf16 = evaluate.scores_from_results(_results(BASE))
    w4 = evaluate.scores_from_results(_results(TUNED))
    by = {(r.task, r.metric): r for r in evaluate.recovery(bf16, w4)}
    assert by[("arc_challenge", "acc_norm")].recovery_pct == pytest.approx(58.9 / 61.2 * 100)
    assert by[("mmlu", "acc")].recovery_pct == pytest.approx(73.95 / 74.12 * 100)
    zero = _results({"tiny_synth_em": {"exact_match,none": 0.0, "exact_match_stderr,none": 0.0}})
    zero["n-samples"]["tiny_synth_em"] = {"original": 200, "effective": 200}
    rows = evaluate.recovery(evaluate.scores_from_results(zero), evaluate.scores_from_results(zero))
    assert rows[0].recovery_pct is None
