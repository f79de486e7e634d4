"""Deployment vs direct run: `prefect deployment run finetune/tiny-cpu --watch` through a real server and worker
against `finetune run --profile tiny-cpu` (ephemeral API), fresh and fully cached.

Setup (not timed): `prefect server start` on a free loopback port, `bash deployments/create-pools.sh`, one process
worker on `local-process`, `prefect --no-prompt deploy --all` (flows/local_cluster.py, also what `finetune rehearse` runs on). The
deployment runs use store A, the direct runs store B, so each side's first run is a fresh seven-stage run. Then ``--repeats`` cached
reruns of each, alternating (what a schedule tick does when nothing changed); medians reported.

    python bench/bench_deployment.py [--work /tmp/bench-deployment] [--repeats 3]

The last lines are the ratios deployment / direct, fresh and cached.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from finetune.profile import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))  # the loopback cluster harness lives with the tests
from flows.local_cluster import LocalPrefect, start_cluster  # noqa: E402


def deployment_run(cluster: LocalPrefect) -> float:
    run, seconds = cluster.run_deployment("finetune/tiny-cpu", {})
    if run["state"]["type"] != "COMPLETED":
        raise SystemExit(f"deployment run ended {run['state']['name']}")
    return seconds


def direct_run(cluster: LocalPrefect, store: Path) -> tuple[float, bool]:
    """`finetune run` with an ephemeral API of its own (no PREFECT_API_URL), as README command 1 runs it."""
    env = {k: v for k, v in cluster.env.items() if k != "PREFECT_API_URL"}
    env.update(FINETUNE_STORE=str(store), PREFECT_HOME=str(cluster.root / "direct-prefect-home"))
    started = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).with_name("finetune")), "run", "--profile", "tiny-cpu", "--json"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"finetune run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stages = json.loads(proc.stdout)["stages"]
    return seconds, all(stage["cached"] for stage in stages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-deployment"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    cluster = start_cluster(args.work, workers=1)
    try:
        fresh_deployment = deployment_run(cluster)
        print(f"fresh deployment run: {fresh_deployment:.1f} s")
        fresh_direct, cached = direct_run(cluster, args.work / "direct-store")
        assert not cached, "the direct run's store was not empty"
        print(f"fresh direct run:     {fresh_direct:.1f} s")
        cached_deployment, cached_direct = [], []
        for _ in range(args.repeats):
            cached_deployment.append(deployment_run(cluster))
            seconds, all_cached = direct_run(cluster, args.work / "direct-store")
            if not all_cached:
                raise SystemExit("a direct rerun recomputed a stage: not a cached rerun")
            cached_direct.append(seconds)
        print(f"cached deployment runs: {', '.join(f'{s:.1f}' for s in cached_deployment)} s")
        print(f"cached direct runs:     {', '.join(f'{s:.1f}' for s in cached_direct)} s")
    finally:
        cluster.stop()
    dep, direct = statistics.median(cached_deployment), statistics.median(cached_direct)
    print(f"ratio fresh deployment / direct = {fresh_deployment / fresh_direct:.2f}x "
          f"({fresh_deployment:.1f} s vs {fresh_direct:.1f} s)")
    print(f"ratio cached deployment / direct = {dep / direct:.2f}x ({dep:.1f} s vs {direct:.1f} s, "
          f"medians of {args.repeats})")


if __name__ == "__main__":
    main()
