"""The benchmark against real servers: `transformers serve` with a tiny random Llama 4 (bf16 and W4A16), and plain
HTTP servers for lifecycle faults. Every test checks that no server process outlives it."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import psutil
import pytest
import torch

from embedded import tokenizer as tiny_tokenizer
from finetune.procs import free_port, handling_sigterm
from finetune.profile import BenchmarkConfig, load_profile
from finetune.stage import PermanentError, Preempted, StageContext, execute_stage
from finetune.store import Artifact, Store
from tasks.benchmark import SPEC, loadgen, report, run
from tasks.benchmark.runner import BenchmarkError, _check_level, _raise_preempted
from tasks.benchmark.workload import build_workload
from tasks.serving.engines import TRANSFORMERS_SERVE, ServeRequest
from tasks.serving.server import Server, ServerError, serving

pytestmark = pytest.mark.slow  # starts real HTTP servers (transformers serve)

REPO = Path(__file__).resolve().parents[1]
NUM_PROMPTS = 4
MAX_TOKENS = 8

# llmcompressor round-to-nearest W4A16 (group 32: the tiny hidden size is below the usual 128), run in a child
# process so its global patches stay out of the test process.
QUANTIZE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src, dst = sys.argv[1:3]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    # llmcompressor 0.14's Llama 4 MoE linearizer reads config.text_config, which Llama4ForCausalLM lacks.
    model.config.text_config = model.config
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    oneshot(model=model, recipe=QuantizationModifier(config_groups={"g": scheme}, ignore=["lm_head", "re:.*router"]))
    model.save_pretrained(dst, save_compressed=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
""")


def build_tiny_llama4(out: Path) -> None:
    """A 2-layer random Llama4ForCausalLM with the project's tiny BPE tokenizer and chat template."""
    from transformers import GenerationConfig, Llama4ForCausalLM, Llama4TextConfig

    ids = {name: i for i, name in enumerate(tiny_tokenizer.NAMED_SPECIAL_TOKENS)}
    special = {"bos_token_id": ids[tiny_tokenizer.BOS], "eos_token_id": [ids[tiny_tokenizer.EOS],
               ids[tiny_tokenizer.EOT]], "pad_token_id": ids[tiny_tokenizer.PAD]}
    config = Llama4TextConfig(
        vocab_size=tiny_tokenizer.VOCAB_SIZE, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
        num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[1, 0], attention_chunk_size=64,
        max_position_embeddings=512, tie_word_embeddings=False, **special)
    config.architectures = ["Llama4ForCausalLM"]
    torch.manual_seed(0)
    model = Llama4ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name:  # transformers leaves expert weights as torch.empty
                param.normal_(std=0.05)
    model.save_pretrained(out)
    GenerationConfig(**special).save_pretrained(out)
    tiny_tokenizer.save_tokenizer(out)


def write_prompts(model_dir: Path, out: Path) -> None:
    """prompts.jsonl as pack writes it: prompt messages with their chat-templated token count, response length."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    lines = (REPO / "embedded" / "data" / "train.jsonl").read_text().splitlines()[:20]
    with out.open("w") as handle:
        for line in lines:
            messages = json.loads(line)["messages"]
            prompt_ids = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
            response = len(tok(messages[-1]["content"], add_special_tokens=False).input_ids) + 1
            handle.write(json.dumps({"messages": messages[:-1], "prompt_tokens": len(prompt_ids),
                                     "response_tokens": response}) + "\n")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench-models")
    bf16, w4a16, pack = root / "bf16", root / "w4a16", root / "pack"
    build_tiny_llama4(bf16)
    pack.mkdir()
    write_prompts(bf16, pack / "prompts.jsonl")
    subprocess.run([sys.executable, "-c", QUANTIZE_SCRIPT, str(bf16), str(w4a16)], check=True, cwd=root,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return {"bf16": bf16, "w4a16": w4a16, "pack": pack}


@pytest.fixture(scope="module")
def tiny_server(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    cmd = TRANSFORMERS_SERVE.serve_command(ServeRequest(checkpoints["bf16"], port, BenchmarkConfig(), "cpu", 1))
    log = tmp_path_factory.mktemp("bench-server") / "server.log"
    with serving(cmd, port, log, startup_timeout_s=300, env=TRANSFORMERS_SERVE.env()) as server:
        yield server
    assert_group_gone(server.pgid)


def live_group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (psutil.Error, ProcessLookupError):
            pass
    return members


def assert_group_gone(pgid: int | None) -> None:
    """No live process is left in the server's process group (a killed orphan may linger briefly as a zombie
    until init reaps it; it runs nothing)."""
    assert pgid is not None
    deadline = time.monotonic() + 5
    while live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not live_group_members(pgid)


def processes_running(cmd: list[str]) -> list[psutil.Process]:
    return [proc for proc in psutil.process_iter(["cmdline"]) if proc.info["cmdline"] == cmd]


def http_server_cmd(port: int, prelude: str = "") -> list[str]:
    """A plain HTTP server (200 on /) with an optional prelude, e.g. to ignore SIGTERM."""
    code = (f"{prelude}\nimport http.server\n"
            f"http.server.ThreadingHTTPServer(('127.0.0.1', {port}), http.server.SimpleHTTPRequestHandler)"
            ".serve_forever()")
    return [sys.executable, "-c", code]


# -- load generator against the real CPU server -------------------------------------------------------------------

@pytest.mark.parametrize("concurrency", [1, 4])
def test_loadgen_measures_real_streams_at_concurrency(tiny_server: Server, checkpoints: dict[str, Path],
                                                      concurrency: int) -> None:
    requests = build_workload(checkpoints["pack"] / "prompts.jsonl", NUM_PROMPTS, MAX_TOKENS, 512)
    level = loadgen.run_level(tiny_server.base_url, str(checkpoints["bf16"]), requests, concurrency,
                              TRANSFORMERS_SERVE.length_body)
    assert level["completed"] == NUM_PROMPTS and level["failed"] == 0, level["errors"]
    # The server's usage block agrees with the load: exact output lengths, and the prompt counts pack recorded.
    assert level["total_output_tokens"] == sum(r.output_tokens for r in requests)
    assert level["total_input_tokens"] == sum(r.prompt_tokens for r in requests)
    assert level["max_concurrency"] == concurrency
    assert 0 < level["median_ttft_ms"] <= level["p99_ttft_ms"]
    assert level["mean_tpot_ms"] > 0 and level["mean_itl_ms"] > 0
    assert level["mean_e2el_ms"] > level["mean_ttft_ms"]
    assert level["output_throughput"] == pytest.approx(level["total_output_tokens"] / level["duration"])


def test_rejected_requests_count_as_errors_and_fail_the_level(tiny_server: Server,
                                                              checkpoints: dict[str, Path]) -> None:
    requests = build_workload(checkpoints["pack"] / "prompts.jsonl", 2, MAX_TOKENS, 512)
    # The server is pinned to its model: asking for another one is a real HTTP 400.
    level = loadgen.run_level(tiny_server.base_url, "some-other-model", requests, 2, TRANSFORMERS_SERVE.length_body)
    assert level["failed"] == 2 and level["error_rate"] == 1.0
    assert any("HTTP 400" in error for error in level["errors"])
    with pytest.raises(BenchmarkError, match=r"2/2 requests failed .* > benchmark.max_error_rate 1.0%"):
        _check_level(level, "bf16", tiny_server, max_error_rate=0.01)


# -- the stage end to end ------------------------------------------------------------------------------------------

def test_each_benchmark_step_serves_its_model_and_the_two_compare(checkpoints: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    profile = load_profile("tiny-cpu", ["benchmark.concurrencies=[1, 4]", f"benchmark.num_prompts={NUM_PROMPTS}",
                                        f"benchmark.max_tokens={MAX_TOKENS}", "benchmark.engine=transformers-serve"])
    store = Store(tmp_path / "store")
    pack = Artifact(stage="pack", key="pack-key", path=str(checkpoints["pack"]))
    artifacts = {}
    for name, stage in (("bf16", "convert"), ("w4a16", "quantize")):
        model = Artifact(stage=stage, key=f"{stage}-key", path=str(checkpoints[name]))
        artifact, tables = execute_stage(SPEC, profile, store, {"model": model, "pack": pack})
        artifacts[name] = artifact

        workdir = Path(artifact.path)
        assert {"results.json", "latency_vs_throughput.png"} <= set(artifact.files)
        assert (workdir / "latency_vs_throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        results = json.loads((workdir / "results.json").read_text())
        assert results["engine"] == "transformers-serve (CPU stand-in for vLLM)"
        assert results["load_generator"].startswith("finetune loadgen")
        assert any("W4A16" in note for note in results["engine_notes"])
        assert list(results["models"]) == [name] and artifact.metrics["weights"] == name
        expected_tokens = results["workload"]["output_tokens"]["total"]
        levels = results["models"][name]["levels"]
        assert [level["max_concurrency"] for level in levels] == [1, 4]
        for level in levels:
            assert level["failed"] == 0 and level["total_output_tokens"] == expected_tokens
            assert level["median_ttft_ms"] > 0
        assert (workdir / "logs" / f"server-{name}.log").is_file()
        assert not processes_running(results["models"][name]["server_command"])
        assert [(row["model"], row["concurrency"]) for row in tables["levels"]] == [(name, 1), (name, 4)]
        assert artifact.metrics[name]["c4"]["error_rate"] == 0.0
    # The run's comparison reads both steps: 4-bit throughput relative to bf16 at each concurrency.
    levels, engines = report.levels_of([artifacts["w4a16"], artifacts["bf16"]])
    rows = report.comparison_rows(levels, engines)
    assert [(row["model"], row["concurrency"]) for row in rows] == [("bf16", 1), ("bf16", 4), ("w4a16", 1),
                                                                     ("w4a16", 4)]
    stand_in = f"transformers-serve (CPU stand-in for vLLM) {metadata.version('transformers')}"
    assert {row["engine"] for row in rows} == {stand_in}
    assert all(row["tok/s vs bf16"] > 0 for row in rows if row["model"] == "w4a16")
    assert report.latency_vs_throughput_png(levels, engines, "t")[:4] == b"\x89PNG"


# -- server faults ---------------------------------------------------------------------------------------------------

def test_stage_refuses_inputs_that_are_not_the_expected_checkpoints(checkpoints: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    """A missing or wrong model directory is bad input: caught before any server starts, never retried."""
    profile = load_profile("tiny-cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(Artifact(stage="convert", key="k", path=str(empty)), "has no config.json"),
             (Artifact(stage="quantize", key="k", path=str(checkpoints["bf16"])), "expected 'compressed-tensors'"),
             (Artifact(stage="train", key="k", path=str(checkpoints["bf16"])), "not by 'train'")]
    pack = Artifact(stage="pack", key="k", path=str(checkpoints["pack"]))
    for model, message in cases:
        with pytest.raises(PermanentError, match=message):
            run(StageContext(profile=profile, key="k", workdir=tmp_path / "work", inputs={"model": model,
                                                                                          "pack": pack}))
    assert not (tmp_path / "work" / "logs").exists()


def test_corrupt_weights_crash_the_server_with_its_log_in_the_error(checkpoints: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in checkpoints["bf16"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    port = free_port()
    cmd = TRANSFORMERS_SERVE.serve_command(ServeRequest(broken, port, BenchmarkConfig(), "cpu", 1))
    with pytest.raises(ServerError, match="before it became healthy") as info:
        with serving(cmd, port, tmp_path / "server.log", startup_timeout_s=300, env=TRANSFORMERS_SERVE.env()):
            pytest.fail("server must not become healthy")
    assert "safetensors" in str(info.value).lower()
    assert_group_gone(info.value.pgid)


def test_startup_timeout_kills_a_server_still_loading(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    cmd = TRANSFORMERS_SERVE.serve_command(ServeRequest(checkpoints["bf16"], port, BenchmarkConfig(), "cpu", 1))
    with pytest.raises(ServerError, match=r"not healthy .* within 0.5 s") as info:
        with serving(cmd, port, tmp_path / "server.log", startup_timeout_s=0.5, env=TRANSFORMERS_SERVE.env()):
            pytest.fail("server must not become healthy in 0.5 s")
    assert_group_gone(info.value.pgid)
    assert not processes_running(cmd)


def test_port_in_use_is_refused_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerError, match=f"port {port} is already in use"):
            with serving(http_server_cmd(port), port, tmp_path / "server.log"):
                pytest.fail("must not start")
    assert not (tmp_path / "server.log").exists()


# -- lifecycle -----------------------------------------------------------------------------------------------------

def test_stop_takes_down_the_whole_process_group(tmp_path: Path) -> None:
    port = free_port()
    # The server leaves a long-running child behind in its group, as engines with worker processes do.
    cmd = ["bash", "-c", f"sleep 300 & exec {shlex.join(http_server_cmd(port))}"]
    with serving(cmd, port, tmp_path / "server.log", health_path="/", startup_timeout_s=30) as server:
        server.remember_descendants()
        sleeper = [p for p in server.descendants.values() if p.name() == "sleep"]
        assert sleeper, "the test server should have a sleep child"
    assert_group_gone(server.pgid)
    with contextlib.suppress(psutil.NoSuchProcess):
        assert sleeper[0].status() == psutil.STATUS_ZOMBIE


def test_a_server_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    port = free_port()
    cmd = http_server_cmd(port, "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    started = time.monotonic()
    with serving(cmd, port, tmp_path / "server.log", health_path="/", startup_timeout_s=30, grace_s=1.0) as server:
        pass
    assert time.monotonic() - started < 20
    assert server.proc.returncode == -signal.SIGKILL
    assert_group_gone(server.pgid)


def test_sigterm_during_the_benchmark_stops_the_server_and_raises_preempted(tmp_path: Path) -> None:
    port = free_port()
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted):
        with handling_sigterm(_raise_preempted):
            with serving(http_server_cmd(port), port, tmp_path / "server.log", health_path="/",
                         startup_timeout_s=30) as server:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
    assert_group_gone(server.pgid)
    assert signal.getsignal(signal.SIGTERM) is previous
