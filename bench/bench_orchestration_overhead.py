"""Orchestration overhead of the train stage: the stage (render config, launch `tune run`, stream and parse its log,
read metrics, plot, hash and record the artifact) vs the same `tune run` command run bare on the same rendered config.

Setup (not timed): download + pack of tiny-cpu (plus ``--override``s) into ``--work``/store, and one stage run whose
``torchtune_config.yaml`` the bare runs reuse (only ``output_dir`` changes). Then, interleaved, ``--repeats`` times:
- stage: ``execute_stage(train)`` in a fresh store directory, in a process that already imported the stage (as the
  flow's process has); its wall time is taken around the call, and the whole process's too;
- bare: ``tune run tunerecipes/sft.py --config <rendered> output_dir=<fresh>``, output to a log file, launched the
  way the stage launches it (cwd = repo, PYTHONPATH = repo).

    python bench/bench_orchestration_overhead.py [--work /tmp/bench-orchestration] [--repeats 3] [--override k=v ...]

The last line is the ratio stage / bare (goal < 3% extra wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# tiny-cpu as shipped (6 epochs of 72 steps) is a run of a few minutes on 2 cores.
DEFAULT_OVERRIDES: list[str] = []
STAGE_RUNNER = """
import json, sys, time
from finetune.profile import load_profile
from finetune.stage import execute_stage
from finetune.store import Store
from tasks import train

store, keys, overrides = Store(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
profile = load_profile("tiny-cpu", overrides)
inputs = {slot: store.read_artifact(slot, key) for slot, key in keys.items()}
started = time.perf_counter()
artifact, _ = execute_stage(train.SPEC, profile, store, inputs)
print(json.dumps({"stage_seconds": time.perf_counter() - started, "key": artifact.key, "path": artifact.path,
                  "metrics": artifact.metrics}), flush=True)
"""


def bench_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FINETUNE_"))}
    env.update(FINETUNE_SCRATCH=str(work / "scratch"), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def prepare_inputs(work: Path, overrides: list[str]) -> dict[str, str]:
    """download + pack into work/store (cached when already there); returns their keys."""
    os.environ["FINETUNE_SCRATCH"] = str(work / "scratch")
    from finetune.profile import load_profile
    from finetune.stage import execute_stage
    from finetune.store import Store
    from tasks import download, pack

    profile, store = load_profile("tiny-cpu", overrides), Store(work / "store")
    model, _ = execute_stage(download.SPEC, profile, store, {})
    packed, _ = execute_stage(pack.SPEC, profile, store, {"download": model})
    return {"download": model.key, "pack": packed.key}


def fresh_store(work: Path, keys: dict[str, str], name: str) -> Path:
    """A store holding only the finished inputs, so the train stage really trains."""
    store = work / "runs" / name
    shutil.rmtree(store, ignore_errors=True)
    for slot, key in keys.items():
        shutil.copytree(work / "store" / slot / key, store / slot / key)
    return store


def start_stage(store: Path, keys: dict[str, str], overrides: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", STAGE_RUNNER, str(store), json.dumps(keys), json.dumps(overrides)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)


def run_stage(store: Path, keys: dict[str, str], overrides: list[str], env: dict[str, str]) -> dict[str, Any]:
    started = time.perf_counter()
    proc = start_stage(store, keys, overrides, env)
    stdout, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"train stage failed ({proc.returncode}) in {store}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def step_seconds(metrics: Path) -> float:
    """Sum of the trainer's own per-step compute times (what the machine's load moves, orchestration cannot)."""
    return sum(json.loads(line)["step_time_s"] for line in metrics.read_text().splitlines() if line.strip())


def run_bare(config: Path, output_dir: Path, env: dict[str, str]) -> float:
    shutil.rmtree(output_dir, ignore_errors=True)
    output_dir.mkdir(parents=True)
    from tasks.train.launch import RECIPE, tune_executable

    started = time.perf_counter()
    with open(output_dir.parent / f"{output_dir.name}.log", "w") as log:
        code = subprocess.call([tune_executable(), "run", RECIPE, "--config", str(config), f"output_dir={output_dir}"],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"bare tune run failed ({code}); see {output_dir}.log")
    return time.perf_counter() - started


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):7.2f} s (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-orchestration"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--override", action="append", default=None, help="profile override (default: none)")
    args = parser.parse_args()
    overrides = args.override or DEFAULT_OVERRIDES
    env = bench_env(args.work)
    keys = prepare_inputs(args.work, overrides)

    first = run_stage(fresh_store(args.work, keys, "setup"), keys, overrides, env)  # also renders the config
    config = args.work / "torchtune_config.yaml"
    shutil.copy(Path(first["path"]) / "torchtune_config.yaml", config)
    print(f"setup: {first['metrics']['steps']} steps, stage {first['stage_seconds']:.1f} s; overrides {overrides}")

    stage_s, process_s, bare_s, outside_s, steps_stage, steps_bare = [], [], [], [], [], []
    for repeat in range(args.repeats):  # interleaved, so drift in the machine's load hits both alike
        result = run_stage(fresh_store(args.work, keys, f"stage-{repeat}"), keys, overrides, env)
        stage_s.append(result["stage_seconds"])
        process_s.append(result["process_seconds"])
        # Everything the stage does besides waiting for its trainer: render, read metrics, plot, hash, record.
        outside_s.append(result["stage_seconds"] - result["metrics"]["wall_time_s"])
        steps_stage.append(step_seconds(Path(result["path"]) / "metrics.jsonl"))
        bare_dir = args.work / "runs" / f"bare-{repeat}"
        bare_s.append(run_bare(config, bare_dir, env))
        steps_bare.append(step_seconds(bare_dir / "metrics.jsonl"))
        print(f"repeat {repeat}: stage {stage_s[-1]:.2f} s (process {process_s[-1]:.2f} s, outside the trainer "
              f"{outside_s[-1]:.2f} s, step compute {steps_stage[-1]:.1f} s), bare {bare_s[-1]:.2f} s (step compute "
              f"{steps_bare[-1]:.1f} s)")
    print(f"{'bare tune run':>28}: {spread(bare_s)}")
    print(f"{'train stage (execute_stage)':>28}: {spread(stage_s)}")
    print(f"{'  + process start, imports':>28}: {spread(process_s)}")
    print(f"{'stage outside the trainer':>28}: {spread(outside_s)}")
    print(f"{'step compute stage / bare':>28}: {statistics.median(steps_stage) / statistics.median(steps_bare):.3f} "
          f"(the machine's load, not orchestration, moves this)")
    paired = [s / b - 1 for s, b in zip(stage_s, bare_s)]
    ratio = statistics.median(stage_s) / statistics.median(bare_s)
    outside = statistics.median(outside_s)
    print(f"ratio train stage / bare tune run = {ratio:.4f} ({100 * (ratio - 1):+.1f}% wall time; paired per repeat "
          f"{', '.join(f'{100 * p:+.1f}%' for p in paired)}; with process start and imports "
          f"{100 * (statistics.median(process_s) / statistics.median(bare_s) - 1):+.1f}%; outside the trainer "
          f"{outside:.2f} s = {100 * outside / statistics.median(bare_s):.1f}%; goal < +3%), median of {args.repeats}")


if __name__ == "__main__":
    main()
