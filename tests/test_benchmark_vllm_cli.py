"""Our `vllm serve` / `vllm bench serve` command lines use only flags vLLM defines, with values where vLLM expects them.

The flags below were read from the vllm 0.33.0 wheel on PyPI (vllm-0.33.0-cp38-abi3-manylinux_2_28_x86_64.whl,
the newest release when this was written):
- vllm/entrypoints/common/cli_args.py: `make_arg_parser` (positional `model_tag`), `FrontendArgs.host`/`.port`
  registered as --host/--port by `BaseFrontendArgs.add_cli_args` (field name -> --kebab-case).
- vllm/engine/arg_utils.py: --seed (model group), --max-model-len, --tensor-parallel-size (parallel group),
  --gpu-memory-utilization (cache group).
- vllm/benchmarks/serve.py `add_cli_args`: --backend (choices = keys of ASYNC_REQUEST_FUNCS in
  vllm/benchmarks/lib/endpoint_request_func.py, which include "openai-chat"), --base-url, --endpoint, --model,
  --max-concurrency, --request-rate, --ignore-eos, --temperature, --percentile-metrics ("ttft", "tpot", "itl",
  "e2el", ...), --metric-percentiles, --disable-tqdm, --save-result, --save-detailed, --result-dir, --result-filename.
- vllm/benchmarks/datasets/datasets.py `add_dataset_parser`: --seed, --num-prompts, --dataset-name (choices include
  "custom"), --dataset-path, --no-oversample, --skip-chat-template, --disable-shuffle, --custom-output-len
  ("-1" = take each record's `output_tokens`, see `CustomDataset.sample`).
Other revisions read through the code index (vllm/benchmarks/serve.py at def9ce85ba10,
vllm/benchmarks/datasets/arg_utils.py and custom.py at 237145ea190a) define the same flags, but their custom dataset
has no per-record `output_tokens`: the vllm bench path needs a vLLM whose custom dataset reads it, as 0.33.0's does.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from finetune.profile import BenchmarkConfig
from tasks.benchmark import vllm_cli
from tasks.benchmark.workload import BenchRequest
from tasks.serving import vllm
from tasks.serving.engines import VLLM

# flag -> whether it takes a value (False: store_true)
VLLM_SERVE_FLAGS = {
    "--host": True, "--port": True, "--seed": True, "--max-model-len": True, "--tensor-parallel-size": True,
    "--gpu-memory-utilization": True, "--enable-auto-tool-choice": False, "--tool-call-parser": True,
}
VLLM_BENCH_SERVE_FLAGS = {
    "--backend": True, "--base-url": True, "--endpoint": True, "--model": True, "--max-concurrency": True,
    "--request-rate": True, "--ignore-eos": False, "--temperature": True, "--percentile-metrics": True,
    "--metric-percentiles": True, "--disable-tqdm": False, "--save-result": False, "--save-detailed": False,
    "--result-dir": True, "--result-filename": True, "--seed": True, "--num-prompts": True, "--dataset-name": True,
    "--dataset-path": True, "--no-oversample": False, "--skip-chat-template": False, "--disable-shuffle": False,
    "--custom-output-len": True,
}
BACKEND_CHOICES = {"vllm", "openai", "openai-chat", "openai-responses", "openai-audio"}
DATASET_CHOICES = {"sharegpt", "burstgpt", "random", "random-mm", "random-rerank", "hf", "custom", "custom_audio",
                   "custom_image", "prefix_repetition", "spec_bench", "speed_bench", "timed_trace"}
PERCENTILE_METRICS = {"ttft", "tpot", "itl", "e2el", "client_queue_time", "e2el_including_client_queue"}


def parse_flags(args: list[str], known: dict[str, bool]) -> tuple[list[str], dict[str, str | None]]:
    """Split argv into positionals and flags, failing on any flag vLLM does not define or a misplaced value."""
    positionals, flags, i = [], {}, 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            positionals.append(token)
            i += 1
            continue
        assert token in known, f"{token} is not a flag of the vLLM command"
        assert token not in flags, f"{token} given twice"
        if known[token]:
            assert i + 1 < len(args) and not args[i + 1].startswith("--"), f"{token} needs a value"
            flags[token] = args[i + 1]
            i += 2
        else:
            flags[token] = None
            i += 1
    return positionals, flags


def test_vllm_serve_command_uses_only_documented_flags() -> None:
    cfg = BenchmarkConfig(tensor_parallel_size=8, max_model_len=4096, gpu_memory_utilization=0.85)
    args = vllm.serve_args(Path("/models/bf16"), 8123, cfg)
    assert args[0] == "serve"
    positionals, flags = parse_flags(args[1:], VLLM_SERVE_FLAGS)
    assert positionals == ["/models/bf16"]
    assert flags == {"--host": "127.0.0.1", "--port": "8123", "--tensor-parallel-size": "8",
                     "--max-model-len": "4096", "--gpu-memory-utilization": "0.85", "--seed": "0",
                     "--enable-auto-tool-choice": None, "--tool-call-parser": "llama4_pythonic"}


def test_vllm_engine_runs_the_vllm_cli_found_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM pins its own torch, so it may live in another environment: its `vllm` script on PATH is enough."""
    if (Path(sys.executable).parent / "vllm").is_file():
        pytest.skip("this environment has its own vllm, which takes precedence")
    script = tmp_path / "vllm"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    cfg = BenchmarkConfig()
    assert VLLM.serve_command(Path("/m"), 9000, cfg) == [str(script), *vllm.serve_args(Path("/m"), 9000, cfg)]


def test_vllm_bench_command_uses_only_documented_flags_and_choices(tmp_path: Path) -> None:
    args = vllm_cli.bench_args("http://127.0.0.1:8123", "/models/bf16", tmp_path / "requests.jsonl", 200, 32,
                               tmp_path, "bf16-c32.json")
    assert args[:2] == ["bench", "serve"]
    positionals, flags = parse_flags(args[2:], VLLM_BENCH_SERVE_FLAGS)
    assert positionals == []
    assert flags["--backend"] in BACKEND_CHOICES and flags["--backend"] == "openai-chat"
    assert flags["--endpoint"] == "/v1/chat/completions"
    assert flags["--dataset-name"] in DATASET_CHOICES and flags["--dataset-name"] == "custom"
    assert set(flags["--percentile-metrics"].split(",")) <= PERCENTILE_METRICS
    assert [float(p) for p in flags["--metric-percentiles"].split(",")] == [50.0, 99.0]
    assert flags["--custom-output-len"] == "-1"  # each record's output_tokens
    assert flags["--num-prompts"] == "200" and flags["--max-concurrency"] == "32"
    assert float(flags["--request-rate"]) == float("inf")
    for switch in ("--ignore-eos", "--skip-chat-template", "--disable-shuffle", "--no-oversample", "--save-result"):
        assert switch in flags


def test_custom_dataset_holds_each_request_prompt_and_length_in_order(tmp_path: Path) -> None:
    requests = [BenchRequest([{"role": "user", "content": f"q{i}"}], 5, i + 1) for i in range(3)]
    path = tmp_path / "requests.jsonl"
    vllm_cli.write_custom_dataset(requests, path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"prompt": "q0", "output_tokens": 1}, {"prompt": "q1", "output_tokens": 2},
                    {"prompt": "q2", "output_tokens": 3}]


def test_custom_dataset_cannot_express_multi_message_prompts() -> None:
    single = BenchRequest([{"role": "user", "content": "q"}], 3, 2)
    with_system = BenchRequest([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], 5, 2)
    assert vllm_cli.can_express([single])
    assert not vllm_cli.can_express([single, with_system])


def _bench_result(completed: int, failed: int) -> dict:
    """A result JSON with the keys vllm/benchmarks/serve.py writes (main_async + benchmark + process_one_metric)."""
    data = {"date": "20261123-010203", "backend": "openai-chat", "model_id": "/models/bf16", "num_prompts": 10,
            "request_rate": "inf", "burstiness": 1.0, "max_concurrency": 8, "duration": 2.0,
            "completed": completed, "failed": failed, "total_input_tokens": 100, "total_output_tokens": 400,
            "request_throughput": completed / 2.0, "request_goodput": None, "output_throughput": 200.0,
            "total_token_throughput": 250.0, "max_output_tokens_per_s": 210.0, "max_concurrent_requests": 8,
            "errors": [""] * completed + ["Bad Request"] * failed}
    for i, metric in enumerate(("ttft", "tpot", "itl", "e2el")):
        data |= {f"mean_{metric}_ms": 10.0 + i, f"median_{metric}_ms": 9.0 + i, f"std_{metric}_ms": 1.0,
                 f"p50_{metric}_ms": 9.0 + i, f"p99_{metric}_ms": 20.0 + i}
    return data


def test_bench_result_parses_into_a_level_summary_with_error_rate(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps(_bench_result(completed=9, failed=1)))
    level = vllm_cli.parse_result(path, concurrency=8)
    assert level["max_concurrency"] == 8 and level["num_prompts"] == 10
    assert level["error_rate"] == pytest.approx(0.1)
    assert level["errors"] == ["Bad Request"]
    assert level["output_throughput"] == 200.0 and level["median_ttft_ms"] == 9.0 and level["p99_itl_ms"] == 22.0


def test_bench_result_without_latency_percentiles_is_rejected(tmp_path: Path) -> None:
    data = _bench_result(completed=10, failed=0)
    del data["p99_tpot_ms"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match="p99_tpot_ms"):
        vllm_cli.parse_result(path, concurrency=1)


@pytest.mark.skipif(vllm.vllm_executable() is not None, reason="vllm is installed here")
def test_vllm_engine_without_vllm_installed_is_a_permanent_error(tmp_path: Path) -> None:
    from finetune.profile import load_profile
    from finetune.stage import PermanentError, StageContext
    from finetune.store import Artifact
    from tasks.benchmark import run

    profile = load_profile("scout-lora")
    assert profile.benchmark.engine == "vllm"
    inputs = {"model": Artifact(stage="convert", key="k", path=str(tmp_path)),
              "pack": Artifact(stage="pack", key="k", path=str(tmp_path))}
    with pytest.raises(PermanentError, match="no vLLM CLI is found"):
        run(StageContext(profile=profile, key="k", workdir=tmp_path, inputs=inputs))
