"""Cached rerun: `finetune run --profile tiny-cpu` when every stage is already finished, and what its wall time is.

Setup (not timed): one full tiny-cpu run into ``--work``/store (reused when ``--work`` already holds one). Then, each
in a fresh process, median over ``--repeats``, after one untimed warm-up of each (the first ephemeral Prefect start in
a new PREFECT_HOME migrates its database):
- ``import prefect``: the floor of any Prefect process;
- an empty ``@flow`` run against the same ephemeral API: the floor of any Prefect flow run;
- the cached ``finetune run --profile tiny-cpu --json`` (every stage must report cached).
One more cached run under cProfile splits the time: imports, ephemeral server start/stop, artifact verification
(hashing), Prefect task/artifact calls, the flow body.

    python bench/bench_cached_rerun.py [--work /tmp/bench-cached-rerun] [--repeats 5]

The last line is the ratio: cached rerun vs an empty flow run (goal: cached rerun < 15 s).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EMPTY_FLOW = "from prefect import flow\n@flow\ndef empty():\n    return 1\nempty()\n"
# Profile rows: label -> function-name suffixes (file:function) whose cumulative time is reported.
BREAKDOWN = {
    "imports (all modules)": ["<frozen importlib._bootstrap>:_find_and_load"],
    "ephemeral server start": ["prefect/server/api/server.py:start"],
    "ephemeral server stop": ["prefect/server/api/server.py:stop"],
    "flow call (engine + body)": ["flows/finetune.py:finetune"],
    "stage tasks (run_stage)": ["flows/stage_tasks.py:run_stage"],
    "artifact verification": ["finetune/store.py:verified_artifact"],
    "  of which sha256": ["finetune/hashing.py:sha256_file"],
    "stage keys (fingerprints)": ["finetune/stage.py:stage_key"],
    "UI artifacts (markdown/table)": ["prefect/artifacts.py:create_markdown_artifact",
                                      "prefect/artifacts.py:create_table_artifact",
                                      "prefect/artifacts.py:create_image_artifact"],
}


def bench_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(FINETUNE_STORE=str(work / "store"), FINETUNE_SCRATCH=str(work / "scratch"),
               PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               PYTHONPATH=str(REPO))
    return env


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def cached_stages(stdout: str) -> dict[str, bool]:
    summary = json.loads(stdout[stdout.index("{\n"):])
    return {name: info["cached"] for name, info in summary["stages"].items()}


def profile_rows(stats_path: Path) -> dict[str, float]:
    stats = pstats.Stats(str(stats_path)).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
    rows = {}
    for label, suffixes in BREAKDOWN.items():
        total = 0.0
        for (file, _line, func), (_cc, _nc, _tt, cumulative, _callers) in stats.items():
            if any(f"{file}:{func}".endswith(suffix) for suffix in suffixes):
                total += cumulative
        rows[label] = total
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-cached-rerun"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = bench_env(args.work)
    run = [sys.executable, "-m", "entrypoints.cli", "run", "--profile", "tiny-cpu", "--json"]

    setup_s, stdout = timed(run, env)  # computes what is missing, a no-op when --work already holds a run
    print(f"setup run: {setup_s:.1f} s, {sum(not c for c in cached_stages(stdout).values())} stages computed")
    commands = {
        "import prefect": [sys.executable, "-c", "import prefect"],
        "empty flow run": [sys.executable, "-c", EMPTY_FLOW],
        "cached tiny-cpu rerun": run,
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for name, cmd in commands.items():
        timed(cmd, env)  # warm-up, not counted
    for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits all three alike
        for name, cmd in commands.items():
            seconds, stdout = timed(cmd, env)
            times[name].append(seconds)
            if cmd is run:
                assert all(cached_stages(stdout).values()), cached_stages(stdout)
    for name, values in times.items():
        print(f"{name:>22}: median {statistics.median(values):6.2f} s  (min {min(values):.2f}, max {max(values):.2f},"
              f" n={len(values)})")

    stats_path = args.work / "cached-rerun.prof"
    profiled_s, _ = timed([sys.executable, "-m", "cProfile", "-o", str(stats_path), *run[1:]], env)
    print(f"profiled cached rerun: {profiled_s:.2f} s wall under cProfile; cumulative time in:")
    for label, seconds in profile_rows(stats_path).items():
        print(f"  {label:<32} {seconds:6.2f} s  {100 * seconds / profiled_s:5.1f}%")

    cached, empty, floor = (statistics.median(times[n]) for n in ("cached tiny-cpu rerun", "empty flow run",
                                                                    "import prefect"))
    print(f"ratio cached tiny-cpu rerun / empty Prefect flow run = {cached / empty:.2f}x ({cached:.2f} s vs "
          f"{empty:.2f} s; import prefect {floor:.2f} s; goal < 15 s), median of {args.repeats}")


if __name__ == "__main__":
    main()
