"""Resume cost: the train stage SIGKILLed (its process and every descendant, as a lost machine) at a random optimizer
step, then run again in the same store, vs the same stage run uninterrupted.

Reports per kill: the step it died in, the checkpoint the rerun resumed from, steps redone (goal <= one checkpoint
interval, train.checkpoint_every_steps), and the extra wall time (killed attempt + rerun - uninterrupted median).
Shares its setup with bench_orchestration_overhead.py (download + pack of tiny-cpu into ``--work``/store).

    python bench/bench_resume.py [--work /tmp/bench-resume] [--repeats 3] [--seed 0] [--override k=v ...]

The last line is the ratio (killed + rerun) / uninterrupted wall time, and the steps redone.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import time
from pathlib import Path

import psutil

from bench_orchestration_overhead import bench_env, fresh_store, prepare_inputs, run_stage, spread, start_stage

# 2 of tiny-cpu's 6 epochs (144 steps) with its own checkpoint interval (50 steps).
DEFAULT_OVERRIDES = ["train.epochs=2"]


def kill_tree(pid: int) -> None:
    """Stop then SIGKILL ``pid`` and all descendants (the trainer runs in a session of its own)."""
    root = psutil.Process(pid)
    family = [root, *root.children(recursive=True)]
    for process in family:
        process.send_signal(signal.SIGSTOP)
    family += [c for p in family for c in p.children(recursive=True) if c not in family]
    for process in family:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)


def steps_logged(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def killed_then_rerun(work: Path, keys: dict[str, str], overrides: list[str], env: dict[str, str], name: str,
                      train_key: str, kill_step: int) -> dict[str, float]:
    store = fresh_store(work, keys, name)
    metrics = store / "train" / train_key / "metrics.jsonl"
    started = time.perf_counter()
    proc = start_stage(store, keys, overrides, env)
    while steps_logged(metrics) < kill_step:
        if proc.poll() is not None:
            raise SystemExit(f"training ended before step {kill_step}")
        time.sleep(0.02)
    died_at = steps_logged(metrics)  # a step logs when it ends: the kill lands inside the next one
    kill_tree(proc.pid)
    killed_s = time.perf_counter() - started
    rerun = run_stage(store, keys, overrides, env)
    resumed = rerun["metrics"]["resumed_from_step"] or 0
    return {"kill_step": died_at + 1, "resumed_from": resumed, "redone": died_at - resumed,
            "killed_s": killed_s, "rerun_s": rerun["process_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-resume"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=None,
                        help=f"profile override (default: {' '.join(DEFAULT_OVERRIDES)})")
    args = parser.parse_args()
    overrides = args.override or DEFAULT_OVERRIDES
    env = bench_env(args.work)
    keys = prepare_inputs(args.work, overrides)
    rng = random.Random(args.seed)

    full_s, kills = [], []
    total_steps, every, train_key = 0, 0, ""
    for repeat in range(args.repeats):  # interleaved, so drift in the machine's load hits both alike
        result = run_stage(fresh_store(args.work, keys, f"full-{repeat}"), keys, overrides, env)
        full_s.append(result["process_seconds"])
        total_steps, train_key = result["metrics"]["steps"], result["key"]
        every = json.loads((Path(result["path"]) / "artifact.json").read_text())["config"]["profile"]["train"][
            "checkpoint_every_steps"]
        kill = killed_then_rerun(args.work, keys, overrides, env, f"killed-{repeat}", train_key,
                                 rng.randint(1, total_steps - 2))
        kills.append(kill)
        print(f"repeat {repeat}: uninterrupted {full_s[-1]:.1f} s; killed in step {kill['kill_step']} after "
              f"{kill['killed_s']:.1f} s, rerun resumed from step {kill['resumed_from']} ({kill['redone']} steps "
              f"redone) in {kill['rerun_s']:.1f} s")
    interrupted = [k["killed_s"] + k["rerun_s"] for k in kills]
    full = statistics.median(full_s)
    print(f"{'uninterrupted':>20}: {spread(full_s)}  ({total_steps} steps, checkpoint every {every})")
    print(f"{'killed + rerun':>20}: {spread(interrupted)}")
    extra = [100 * (t / full - 1) for t in interrupted]
    print(f"{'extra wall time':>20}: {', '.join(f'{t - full:+.1f} s' for t in interrupted)} (a restart's process "
          f"start, imports and trainer start, plus the steps redone)")
    redone = [k["redone"] for k in kills]
    print(f"ratio (killed + rerun) / uninterrupted = {statistics.median(interrupted) / full:.3f} (extra wall time "
          f"{', '.join(f'{e:+.0f}%' for e in extra)}); steps redone {redone}, max {max(redone)} vs checkpoint "
          f"interval {every} (goal <= {every}), {args.repeats} kills")


if __name__ == "__main__":
    main()
