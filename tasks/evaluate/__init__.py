"""evaluate: EleutherAI lm-eval on one Hugging Face checkpoint (upstream "model": base, tuned or 4-bit).

The flow runs this stage on the base model (download), the tuned model (convert) and the 4-bit model (quantize); the
key includes that model's artifact key, so the base is scored once per revision and task set. Comparison, the quality
gate and 4-bit recovery are plain functions over two evaluate artifacts (tasks.evaluate.report).

Task choice. Tiny default: the project's own tasks in embedded/lm_eval_tasks on the shipped held-out split
(tiny_synth_em: exact match of generated answers; tiny_synth_mc: four-way log-likelihood choice, acc and Brier
score). Real Llama 4 Instruct profiles, all in lm-eval 0.4.13's registry and scored through the chat template:
- mmlu (group, 14k questions, acc): broad knowledge the tune must not erase; its size gives a ~0.4-point stderr, the
  tightest regression signal for a max_drop gate.
- arc_challenge (acc_norm): grade-school science reasoning, a second, independent forgetting check.
- gsm8k (exact_match, strict-match / flexible-extract): multi-step generation, which SFT on chat data can degrade
  even when multiple-choice scores hold.
- ifeval (prompt/instruction-level strict/loose acc): instruction following, what chat SFT is meant to move; needs
  lm-eval's `ifeval` extra (langdetect, immutabledict).

results.json is lm-eval's own output (per-task metrics with stderr, task configs, versions, n-samples, lm-eval
version) less the per-document samples, which go to samples/<task>.jsonl.gz, plus a "finetune" section: the tasks
reported, backend, model args, load and evaluation wall time.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from finetune.hashing import hash_json, sha256_file
from finetune.profile import Profile, resolve_repo_path
from finetune.stage import PermanentError, StageContext, StageSpec
from finetune.store import atomic_file
from tasks.evaluate import harness, preference
from tasks.evaluate.report import (
    RESULTS_FILE,
    Delta,
    GateFailed,
    Recovery,
    Score,
    check_gate,
    compare,
    compare_scores,
    markdown_table,
    recovery,
    scores,
    scores_from_results,
    table_rows,
)
from tasks.serving import vllm, vllm_env
from tasks.serving.engines import VLLM, engine_for, serving_key

__all__ = [
    "SPEC",
    "Delta",
    "GateFailed",
    "Recovery",
    "Score",
    "check_gate",
    "compare",
    "compare_scores",
    "markdown_table",
    "recovery",
    "run",
    "scores",
    "scores_from_results",
    "table_rows",
]


def _config(profile: Profile) -> dict[str, Any]:
    cfg = profile.evaluate
    # The gate judges results; it does not shape them, so changing it must not re-run an evaluation. Which weights
    # are scored is the input artifact's (convert or quantize), already in the key.
    out = cfg.model_dump(exclude={"gate", "weights"})
    if cfg.backend == "vllm":
        serving = profile.benchmark
        out["serving"] = {"tensor_parallel_size": serving.tensor_parallel_size,
                          "max_model_len": serving.max_model_len,
                          "gpu_memory_utilization": serving.gpu_memory_utilization,
                          **serving_key(profile)}
    return out


def backend_for(profile: Profile, model_stage: str) -> tuple[str, str | None]:
    """The lm-eval backend that scores the model a ``model_stage`` artifact holds, and why it is not evaluate.backend:
    a model vLLM cannot load here (see engine_for) is scored in-process ('hf'), never by a stand-in server, which
    does not answer log-likelihood requests."""
    if profile.evaluate.backend != "vllm":
        return profile.evaluate.backend, None
    engine, why = engine_for(profile, "w4a16" if model_stage == "quantize" else "bf16")
    return ("vllm", None) if engine == VLLM.name else ("hf", why)


def local_task_files(include_path: Path) -> dict[str, str]:
    """sha256 of every local task file and of each data file a YAML names (dataset_kwargs.data_files)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    files = {p for p in include_path.rglob("*") if p.is_file() and p.suffix in (".yaml", ".py")
             and "__pycache__" not in p.parts}
    for path in [p for p in files if p.suffix == ".yaml"]:
        try:
            data_files = (load_yaml(path, resolve_func=False).get("dataset_kwargs") or {}).get("data_files") or {}
        except Exception as exc:
            raise PermanentError(f"{path}: invalid lm-eval task YAML: {type(exc).__name__}: {exc}") from exc
        names = data_files.values() if isinstance(data_files, dict) else [data_files]
        files |= {(path.parent / name).resolve() for name in names if isinstance(name, str)}
    return {os.path.relpath(p, include_path): sha256_file(p) for p in sorted(files)}


def _fingerprint(profile: Profile) -> dict[str, Any]:
    out: dict[str, Any] = {"lm_eval": harness.lm_eval_version()}
    if profile.evaluate.include_path:
        include = resolve_repo_path(profile.evaluate.include_path).resolve()
        out["local_tasks"] = hash_json(local_task_files(include))
    return out


def _write_samples(workdir: Path, samples: dict[str, list[dict[str, Any]]]) -> None:
    from lm_eval.utils import handle_non_serializable

    for task, rows in samples.items():
        # mtime=0: no timestamp in the gzip header, so equal samples give byte-identical files.
        with atomic_file(workdir / "samples" / f"{task}.jsonl.gz", "wb") as raw, \
                gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as packed, io.TextIOWrapper(packed) as handle:
            for row in rows:
                handle.write(json.dumps(row, default=handle_non_serializable) + "\n")


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.profile.evaluate
    model = ctx.inputs["model"]
    include = resolve_repo_path(cfg.include_path).resolve() if cfg.include_path else None
    backend, why = backend_for(ctx.profile, model.stage)
    if why:
        ctx.log(f"evaluate: scoring {model.stage} model in-process (hf) instead of with vLLM: {why}")
    platform = vllm.serving_platform(ctx.profile)
    if backend == "vllm":
        vllm_env.resolve(platform, ctx.log)  # found or installed, and its floor checked, before tasks or weights load

    ctx.log(f"evaluate: resolving lm-eval tasks {cfg.tasks}" + (f" (local tasks from {include})" if include else ""))
    resolved = harness.resolve_tasks(cfg.tasks, include)
    ctx.progress(0.1, f"tasks ready: {', '.join(resolved.names)}")

    with contextlib.ExitStack() as stack:
        clock = time.perf_counter()
        if backend == "vllm":
            ctx.log(f"evaluate: serving {model.stage} model {model.path} with vllm serve for lm-eval "
                    "local-completions")
            lm, args = stack.enter_context(harness.served_model(
                VLLM, Path(model.path), ctx.profile.benchmark, cfg, ctx.workdir / "logs" / "server.log", platform,
                lock_fds=ctx.lock_fds))
        else:
            args = harness.hf_model_args(model.path, cfg.device)
            lm = harness.load_model(args, cfg.batch_size, cfg.device)
        load_seconds = time.perf_counter() - clock
        ctx.log(f"evaluate: {model.stage} model ready in {load_seconds:.1f}s, lm-eval model args {args}")
        ctx.progress(0.2, f"model loaded in {load_seconds:.1f}s; evaluating")

        clock = time.perf_counter()
        results = harness.evaluate(lm, resolved, cfg)
        measured = None
        if "pack" in ctx.inputs:  # preference data: the validation pairs, scored by the same loaded model
            ctx.progress(0.8, f"scoring the validation preference pairs ({preference.METRIC})")
            measured = preference.accuracy(lm, ctx.inputs["pack"].path, cfg.limit)
            preference.add_to_results(results, measured)
            resolved_names = [*resolved.names, preference.TASK]
        else:
            resolved_names = resolved.names
        eval_seconds = time.perf_counter() - clock
        del lm

    _write_samples(ctx.workdir, results.pop("samples", {}))
    results["finetune"] = {
        "reported_tasks": resolved_names,
        "model": {"stage": model.stage, "key": model.key},
        "backend": backend,
        "engine": f"vllm {VLLM.version(platform)}" if backend == "vllm" else "lm-eval hf (in-process)",
        "model_args": args,
        "load_seconds": round(load_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
    }
    from lm_eval.utils import handle_non_serializable

    with atomic_file(ctx.workdir / RESULTS_FILE, "w") as handle:
        json.dump(results, handle, indent=2, default=handle_non_serializable)

    rows = scores_from_results(results)
    ctx.tables["evaluate"] = table_rows(rows)
    for row in rows:
        spread = f" ± {row.stderr:.1f}" if row.stderr is not None else ""
        ctx.log(f"evaluate: {row.task} {row.metric} = {row.value:.1f}{spread} ({row.samples} samples)")
    ctx.progress(1.0, f"evaluated in {eval_seconds:.1f}s")
    return {
        "lm_eval_version": results.get("lm_eval_version", harness.lm_eval_version()),
        "backend": backend,
        "scores": {f"{r.task}/{r.metric}": round(r.value, 4) for r in rows},
        "stderr": {f"{r.task}/{r.metric}": round(r.stderr, 4) for r in rows if r.stderr is not None},
        "samples": {r.task: r.samples for r in rows},
        "load_seconds": round(load_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        **({preference.METRIC: round(measured["value"], 4), "preference_pairs": measured["pairs"],
            "preference_mean_margin": round(measured["mean_margin"], 4)} if measured else {}),
    }


SPEC = StageSpec(
    name="evaluate",
    version="1",
    run=run,
    config=_config,
    upstream=("model",),
    optional=("pack",),  # preference data (DPO): its validation pairs give preference_accuracy
    fingerprint=_fingerprint,
)
