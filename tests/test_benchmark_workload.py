"""The benchmark load (drawn from prompts.jsonl), its metric summary and the report built from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.stage import PermanentError
from tasks.benchmark import report
from tasks.benchmark.metrics import RequestOutcome, summarize
from tasks.benchmark.workload import build_workload, describe


def write_prompts(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def record(i: int, prompt_tokens: int = 10, response_tokens: int = 5) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}], "prompt_tokens": prompt_tokens,
            "response_tokens": response_tokens}


def test_workload_is_deterministic_and_samples_without_replacement(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "prompts.jsonl", [record(i) for i in range(20)])
    first = build_workload(path, 8, max_tokens=64, max_model_len=512)
    assert first == build_workload(path, 8, max_tokens=64, max_model_len=512)
    contents = [r.messages[0]["content"] for r in first]
    assert len(set(contents)) == 8


def test_workload_repeats_records_when_asked_for_more_than_exist(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "prompts.jsonl", [record(i) for i in range(3)])
    requests = build_workload(path, 10, max_tokens=64, max_model_len=512)
    assert len(requests) == 10
    assert {r.messages[0]["content"] for r in requests} <= {f"question {i}" for i in range(3)}


def test_workload_caps_output_by_max_tokens_and_context_and_skips_overlong_prompts(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "prompts.jsonl", [
        record(0, prompt_tokens=10, response_tokens=500),  # capped by max_tokens
        record(1, prompt_tokens=95, response_tokens=50),  # capped by the context: 100 - 95
        record(2, prompt_tokens=100, response_tokens=1),  # fills the context: dropped
        record(3, prompt_tokens=10, response_tokens=0),  # at least one token
    ])
    requests = build_workload(path, 3, max_tokens=32, max_model_len=100)
    lengths = {r.messages[0]["content"]: r.output_tokens for r in requests}
    assert lengths == {"question 0": 32, "question 1": 5, "question 3": 1}
    assert describe(requests)["output_tokens"]["total"] == 38


def test_workload_names_file_and_line_of_a_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(record(0)) + "\n" + json.dumps({"messages": [], "prompt_tokens": 1,
                                                               "response_tokens": 1}) + "\n")
    with pytest.raises(PermanentError, match=r"prompts.jsonl:2: 'messages' must be a non-empty list"):
        build_workload(path, 1, max_tokens=8, max_model_len=64)
    path.write_text(json.dumps(record(0) | {"response_tokens": "many"}) + "\n")
    with pytest.raises(PermanentError, match=r"prompts.jsonl:1: 'response_tokens' must be a non-negative integer"):
        build_workload(path, 1, max_tokens=8, max_model_len=64)


def test_workload_fails_when_every_prompt_is_too_long(tmp_path: Path) -> None:
    path = write_prompts(tmp_path / "prompts.jsonl", [record(0, prompt_tokens=300)])
    with pytest.raises(PermanentError, match="max_model_len=256"):
        build_workload(path, 1, max_tokens=8, max_model_len=256)


def test_summary_follows_vllm_definitions() -> None:
    outcomes = [
        RequestOutcome(success=True, ttft=0.1, itl=[0.05, 0.05], latency=0.2, prompt_tokens=10, output_tokens=3),
        RequestOutcome(success=True, ttft=0.3, itl=[0.1], latency=0.5, prompt_tokens=20, output_tokens=2),
        RequestOutcome(error="HTTP 500: boom"),
    ]
    level = summarize(outcomes, duration_s=2.0, concurrency=2)
    assert level["completed"] == 2 and level["failed"] == 1 and level["error_rate"] == pytest.approx(1 / 3)
    assert level["request_throughput"] == pytest.approx(1.0)
    assert level["output_throughput"] == pytest.approx(2.5)
    assert level["total_token_throughput"] == pytest.approx(17.5)
    assert level["mean_ttft_ms"] == pytest.approx(200.0)
    # TPOT = (latency - ttft) / (tokens - 1): 50 ms and 200 ms
    assert level["mean_tpot_ms"] == pytest.approx(125.0)
    assert level["median_itl_ms"] == pytest.approx(50.0)
    assert level["p99_e2el_ms"] == pytest.approx(497.0)
    assert level["errors"] == ["HTTP 500: boom"]


def test_comparison_rows_relate_the_quantized_model_to_bf16() -> None:
    def level(c: int, tok_s: float) -> dict:
        outcome = RequestOutcome(success=True, ttft=0.1, itl=[0.1], latency=0.2, prompt_tokens=1, output_tokens=2)
        summary = summarize([outcome], duration_s=1.0, concurrency=c)
        return summary | {"output_throughput": tok_s}

    rows = report.comparison_rows({"bf16": [level(1, 10.0), level(8, 40.0)], "w4a16": [level(1, 15.0),
                                                                                        level(8, 60.0)]},
                                  {"bf16": "vllm 0.33.0", "w4a16": "vllm 0.33.0"})
    assert [(r["model"], r["concurrency"]) for r in rows] == [("bf16", 1), ("bf16", 8), ("w4a16", 1), ("w4a16", 8)]
    assert "tok/s vs bf16" not in rows[0]
    assert rows[2]["tok/s vs bf16"] == 1.5 and rows[3]["tok/s vs bf16"] == 1.5
    assert rows[0]["errors"] == "0/1"
