"""The benchmark stage: serve one checkpoint (bf16 or W4A16) and drive the same load at each concurrency.

Start the engine's server (its own process group), wait for ``/health``, send one warm-up request (lazy
initialisation, e.g. compressed-tensors decompression on the first forward, must not land in the numbers), run every
concurrency level, and stop the server whatever happens. The load generator is ``vllm bench serve`` when the engine is
vLLM, vLLM is installed, ``benchmark.use_vllm_bench`` is on and every prompt is a single user message; otherwise our
own OpenAI-protocol generator (tasks/benchmark/loadgen.py) with the same metric definitions.
"""

from __future__ import annotations

import itertools
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.procs import free_port, handling_sigterm
from finetune.profile import BenchmarkConfig
from finetune.stage import PermanentError, Preempted, StageContext
from finetune.store import Artifact, atomic_file
from tasks.benchmark import loadgen, report, stage_config, vllm_cli
from tasks.benchmark.report import PLOT_FILE, RESULTS_FILE
from tasks.benchmark.workload import BenchRequest, build_workload, describe
from tasks.serving import vllm, vllm_env
from tasks.serving.engines import ENGINES, VLLM, Engine, ServeRequest, engine_for
from tasks.serving.server import Server, log_tail, run_client, serving

# The weights a model artifact holds, by the stage that made it.
WEIGHTS_OF_STAGE = {"convert": "bf16", "quantize": "w4a16"}
OUR_LOADGEN = "finetune loadgen (httpx, streaming /v1/chat/completions)"
VLLM_BENCH = "vllm bench serve"
# A hung external client must not hang the stage: one level may take at most this long.
LEVEL_TIMEOUT_S = 3600.0


class BenchmarkError(PermanentError):
    """Too many requests failed: the numbers would not describe a working server."""


def weights_of(model: Artifact) -> str:
    """"bf16" or "w4a16": what the benchmark calls the model in its results, tables and metrics."""
    if model.stage not in WEIGHTS_OF_STAGE:
        raise PermanentError(f"benchmark serves a checkpoint made by {', '.join(WEIGHTS_OF_STAGE)}, not by "
                             f"{model.stage!r} (artifact {model.key})")
    return WEIGHTS_OF_STAGE[model.stage]


def _checkpoint(model: Artifact, quantized: bool) -> Path:
    path = Path(model.path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise PermanentError(f"{model.stage} artifact {path} has no config.json: not a Hugging Face checkpoint")
    if quantized:
        quant = json.loads(config_path.read_text()).get("quantization_config") or {}
        if quant.get("quant_method") != "compressed-tensors":
            raise PermanentError(f"{config_path}: quantization_config.quant_method is "
                                 f"{quant.get('quant_method')!r}, expected 'compressed-tensors' (W4A16)")
    return path


def _generator(engine: Engine, cfg: BenchmarkConfig, requests: list[BenchRequest], log: Callable[[str], None]) -> str:
    if not (engine is VLLM and cfg.use_vllm_bench):
        return OUR_LOADGEN
    if not vllm_cli.can_express(requests):
        log("some prompts have more than one message, which vllm bench's custom dataset cannot send: "
            "using our own load generator")
        return OUR_LOADGEN
    return VLLM_BENCH


def _raise_preempted(signum: int, frame: object) -> None:
    raise Preempted("received SIGTERM during the benchmark; the server was stopped and the stage will rerun")


def _check_level(level: dict[str, Any], name: str, server: Server, max_error_rate: float) -> None:
    if level["error_rate"] <= max_error_rate:
        return
    message = (f"{name} at concurrency {level['max_concurrency']}: {level['failed']}/{level['num_prompts']} "
               f"requests failed (error rate {level['error_rate']:.1%} > benchmark.max_error_rate "
               f"{max_error_rate:.1%}); errors: {level['errors']}")
    code = server.proc.poll()
    if code is not None:
        tail = "\n".join(f"  | {line}" for line in log_tail(server.log_path))
        message += f"\nthe server exited with code {code}; last lines of {server.log_path}:\n{tail}"
    raise BenchmarkError(message)


class _Level:
    """Runs one concurrency level against a healthy server with the chosen generator."""

    def __init__(self, engine: Engine, generator: str, requests: list[BenchRequest], workdir: Path, platform: str):
        self.engine = engine
        self.generator = generator
        self.platform = platform
        self.requests = requests
        self.workdir = workdir
        self.dataset = workdir / "vllm-bench" / "requests.jsonl"
        if generator == VLLM_BENCH:
            vllm_cli.write_custom_dataset(requests, self.dataset)

    def run(self, server: Server, model: str, name: str, concurrency: int) -> dict[str, Any]:
        if self.generator == OUR_LOADGEN:
            return loadgen.run_level(server.base_url, model, self.requests, concurrency, self.engine.length_body)
        result_dir = self.workdir / "vllm-bench"
        filename = f"{name}-c{concurrency}.json"
        args = vllm_cli.bench_args(server.base_url, model, self.dataset, len(self.requests), concurrency,
                                   result_dir, filename)
        cli = vllm_env.resolve(self.platform)
        vllm.check_flags(cli, ["bench", "serve"], args[2:])
        run_client([*cli.command, *args], result_dir / f"{name}-c{concurrency}.log",
                   LEVEL_TIMEOUT_S, self.engine.env())
        return vllm_cli.parse_result(result_dir / filename, concurrency)


def _benchmark_model(ctx: StageContext, engine: Engine, level_runner: _Level, name: str, model_dir: Path,
                     level_done: Callable[[str], None]) -> dict[str, Any]:
    cfg = ctx.profile.benchmark
    port = cfg.port or free_port()
    cmd = engine.serve_command(ServeRequest(model_dir, port, cfg, level_runner.platform, max(cfg.concurrencies)))
    model = str(model_dir)  # both servers name the model by the path they were started with
    ctx.log(f"{name}: starting {engine.label}: {shlex.join(cmd)}")
    with serving(cmd, port, ctx.workdir / "logs" / f"server-{name}.log", health_path=engine.health_path,
                 startup_timeout_s=cfg.startup_timeout_s, env=engine.env(), pass_fds=ctx.lock_fds) as server:
        ctx.log(f"{name}: server healthy after {server.startup_s:.1f} s")
        warmup = loadgen.run_level(server.base_url, model, level_runner.requests[:1], 1, engine.length_body)
        _check_level(warmup, f"{name} warm-up", server, 0.0)
        levels = []
        for concurrency in cfg.concurrencies:
            level = level_runner.run(server, model, name, concurrency)
            _check_level(level, name, server, cfg.max_error_rate)
            levels.append(level)
            ctx.log(f"{name} c={concurrency}: {level['request_throughput']:.2f} req/s, "
                    f"{level['output_throughput']:.1f} output tok/s, TTFT p50 {level['median_ttft_ms']:.1f} ms, "
                    f"TPOT p50 {level['median_tpot_ms']:.1f} ms, errors {level['failed']}/{level['num_prompts']}")
            level_done(f"{name} concurrency {concurrency} done")
    config = json.loads((model_dir / "config.json").read_text())
    return {"path": model, "checkpoint_dtype": config.get("dtype") or config.get("torch_dtype"),
            "server_command": cmd, "startup_s": round(server.startup_s, 2), "levels": levels}


def _metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers per model and concurrency (the full record is results.json)."""
    out: dict[str, Any] = {"engine": results["engine"], "engine_version": results["engine_version"],
                           "load_generator": results["load_generator"],
                           "weights": next(iter(results["models"]))}
    for name, model in results["models"].items():
        out[name] = {
            f"c{level['max_concurrency']}": {
                "request_throughput": round(level["request_throughput"], 4),
                "output_throughput": round(level["output_throughput"], 3),
                "median_ttft_ms": round(level["median_ttft_ms"], 3),
                "median_tpot_ms": round(level["median_tpot_ms"], 3),
                "p99_itl_ms": round(level["p99_itl_ms"], 3),
                "error_rate": level["error_rate"],
            }
            for level in model["levels"]
        }
    return out


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.profile.benchmark
    name = weights_of(ctx.inputs["model"])
    engine_name, why = engine_for(ctx.profile, name)
    engine = ENGINES[engine_name]
    if why:
        ctx.log(f"benchmark {name}: served by {engine.label}: {why}")
    platform = vllm.serving_platform(ctx.profile)
    # vLLM is found or installed (progress in this stage's log) and checked against its floor before any work.
    if engine is VLLM:
        vllm_env.resolve(platform, ctx.log)
    version = engine.version(platform)
    model_dir = _checkpoint(ctx.inputs["model"], quantized=name == "w4a16")
    requests = build_workload(Path(ctx.inputs["pack"].path) / "prompts.jsonl", cfg.num_prompts, cfg.max_tokens,
                              cfg.max_model_len)
    generator = _generator(engine, cfg, requests, ctx.log)
    ctx.log(f"benchmark {name}: {engine.label} {version}, load generator: {generator}, "
            f"{len(requests)} requests per level at concurrency {cfg.concurrencies}")
    level_runner = _Level(engine, generator, requests, ctx.workdir, platform)
    steps = itertools.count(1)

    def level_done(message: str) -> None:
        ctx.progress(next(steps) / len(cfg.concurrencies), message)

    with handling_sigterm(_raise_preempted):
        model = _benchmark_model(ctx, engine, level_runner, name, model_dir, level_done)
    results = {
        "engine": engine.label,
        "engine_version": version,
        "engine_notes": [why, *engine.notes] if why else list(engine.notes),
        "load_generator": generator,
        "config": stage_config(ctx.profile),
        "workload": describe(requests),
        "models": {name: model},
    }
    with atomic_file(ctx.workdir / RESULTS_FILE, "w") as handle:
        json.dump(results, handle, indent=2)
    levels = {name: model["levels"]}
    engines = {name: report.engine_label(results)}
    report.plot_latency_vs_throughput(levels, engines, ctx.workdir / PLOT_FILE,
                                      f"{name}: {engine.label} {version}, {generator}")
    ctx.tables["levels"] = report.comparison_rows(levels, engines)
    return _metrics(results)
